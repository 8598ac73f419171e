"""Diffusers FLUX.1 transformer -> the original (Black Forest Labs) layout, for weights and for LoRAs.

BFL's ``flux1-dev.safetensors`` (the file ComfyUI's diffusion-model loader and diffusers'
``FluxTransformer2DModel.from_single_file`` read) names the transformer as the reference code does:
``double_blocks.i`` (diffusers' ``transformer_blocks.i``: an image and a text stream, ``img_*`` and
``txt_*``) with one fused ``qkv`` projection per stream, ``single_blocks.i`` (diffusers'
``single_transformer_blocks.i``) whose ``linear1`` fuses q, k, v and the MLP's input projection, and the
embedders ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``. As for SD3
(:mod:`diffalign.train.mmdit_keys`), the final layer's adaptive norm splits its projection into
(shift, scale) where diffusers splits it into (scale, shift), so those rows are swapped back.

kohya-ss's FLUX LoRAs (sd-scripts, read by ComfyUI, Forge and diffusers' ``load_lora_weights``) name
the same modules ``lora_unet_double_blocks_0_img_attn_qkv`` and so on, one LoRA per fused projection.
A LoRA trained on the separate q, k and v becomes one LoRA of rank 3r on their fusion: the down
projections stacked, the up projections block-diagonal, which is the same update
(diag(B_q, B_k, B_v) [A_q; A_k; A_v] = [B_q A_q; B_k A_k; B_v A_v]) and the form sd-scripts writes for
split q/k/v training and diffusers' reader splits back exactly. Parts of a fusion the LoRA did not
train (the single blocks' MLP projection, with the usual attention targets) get zero blocks.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

# diffusers name -> original name, outside the blocks and inside each kind of block
_TOP_LEVEL = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
# fused projections: original name -> the diffusers modules it stacks, in row order
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCKS = (("transformer_blocks.", "double_blocks.", _DOUBLE, _DOUBLE_NORMS, _DOUBLE_FUSED),
           ("single_transformer_blocks.", "single_blocks.", _SINGLE, _SINGLE_NORMS, _SINGLE_FUSED))
_SWAPPED = "final_layer.adaLN_modulation.1."


def _swap_halves(value: Tensor) -> Tensor:
    """(scale, shift) rows <-> (shift, scale)."""
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


def _original_module(module: str) -> str:
    """The original name of a diffusers module path (no parameter suffix) that is not part of a fusion."""
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    for prefix, original, renames, _, _ in _BLOCKS:
        if module.startswith(prefix):
            index, rest = module[len(prefix):].split(".", 1)
            if rest in renames:
                return f"{original}{index}.{renames[rest]}"
    raise KeyError(f"no original FLUX name for {module!r}")


def flux_transformer_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in the reference layout (module docstring).

    Raises ``KeyError`` for a parameter it has no original name for, so nothing is dropped unnoticed.
    """
    state = dict(state)
    out: dict[str, Tensor] = {}
    blocks = {key.split(".", 2)[1] for key in state if key.startswith("transformer_blocks.")}
    singles = {key.split(".", 2)[1] for key in state if key.startswith("single_transformer_blocks.")}
    for (prefix, original, _, norms, fused), indices in zip(_BLOCKS, (blocks, singles)):
        for index in indices:
            source, target = f"{prefix}{index}.", f"{original}{index}."
            for name, parts in fused.items():
                for kind in ("weight", "bias"):
                    out[f"{target}{name}.{kind}"] = torch.cat([state.pop(f"{source}{p}.{kind}") for p in parts])
            for name, new in norms.items():
                out[target + new] = state.pop(source + name)
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        out[f"{_original_module(module)}.{kind}"] = value
    for kind in ("weight", "bias"):
        out[_SWAPPED + kind] = _swap_halves(out[_SWAPPED + kind])
    return out


def flux_lora_to_kohya(layers: Mapping[str, Tensor], inner_dim: int) -> dict[str, Tensor]:
    """A run's FLUX LoRA (``transformer.<module>.lora_A/lora_B.weight``, scale folded in) in kohya-ss names.

    ``inner_dim`` is the transformer's width (heads x head dimension), which sizes the zero blocks of
    fused parts the LoRA did not train (the single blocks' MLP projection is 4x as wide). Every
    LoRA's alpha is its rank, so kohya's scale alpha / rank is 1, as the folded-in scale needs.
    """
    # a LoRA of the attention projections alone keeps diffusers' names (to_q.lora.down.weight); others peft's
    layers = {key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): value
              for key, value in layers.items()}
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for key, value in layers.items():
        module = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        down, up = pairs.get(module, (None, None))
        pairs[module] = (value, up) if ".lora_A." in key else (down, value)
    out: dict[str, Tensor] = {}

    def put(name: str, down: Tensor, up: Tensor) -> None:
        kohya = "lora_unet_" + name.replace(".", "_")
        out.update({f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up,
                    f"{kohya}.alpha": torch.tensor(float(down.shape[0]))})

    for prefix, original, _, _, fused in _BLOCKS:
        indices = {m[len(prefix):].split(".", 1)[0] for m in pairs if m.startswith(prefix)}
        for index in sorted(indices, key=int):
            for name, parts in fused.items():
                modules = [f"{prefix}{index}.{p}" for p in parts]
                present = [pairs.pop(m) for m in modules if m in pairs]
                if present:
                    widths = [4 * inner_dim if p == "proj_mlp" else inner_dim for p in parts]
                    put(f"{original}{index}.{name}", *_fused(modules, present, widths, layers))
    for module, (down, up) in pairs.items():
        put(_original_module(module), down, _swap_halves(up) if module == "norm_out.linear" else up)
    return out


def _fused(modules: list[str], present: list[tuple[Tensor, Tensor]], widths: list[int],
           layers: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """One LoRA on a fused projection: downs stacked, ups block-diagonal; untrained parts as zero blocks."""
    rank, fan_in = present[0][0].shape
    like = present[0][0]
    downs, ups = [], []
    for module, width in zip(modules, widths):
        down = layers.get(f"transformer.{module}.lora_A.weight")
        up = layers.get(f"transformer.{module}.lora_B.weight")
        downs.append(like.new_zeros(rank, fan_in) if down is None else down)
        ups.append(like.new_zeros(width, rank) if up is None else up)
    return torch.cat(downs), torch.block_diag(*ups)
