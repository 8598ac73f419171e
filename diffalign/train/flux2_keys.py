"""FLUX.2's transformer in the layout Black Forest Labs release it (``flux2-dev.safetensors``, the klein files), which
ComfyUI's diffusion-model loader and diffusers' ``Flux2Transformer2DModel.from_single_file`` read: the inverse of
diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``.

A double block's image and text attention fuse q, k and v into one ``qkv`` each (stacked in that order), its norms
are ``norm.query_norm.scale``/``norm.key_norm.scale`` and its feed-forwards ``img_mlp.0``/``img_mlp.2``; a single
block's fused projections are ``linear1``/``linear2``; the final modulation stores (shift, scale) where diffusers
stores (scale, shift)."""

from __future__ import annotations

import re

import torch

Tensor = torch.Tensor
# diffusers' name -> the release's, outside the blocks
TOP_LEVEL = {
    "x_embedder.": "img_in.", "context_embedder.": "txt_in.",
    "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
    "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
    "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
    "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
    "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
    "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
    "single_stream_modulation.linear.": "single_stream_modulation.lin.",
    "proj_out.": "final_layer.linear.",
}
DOUBLE_BLOCK = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
                "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
FUSED = {"to_": "img_attn.qkv", "add_": "txt_attn.qkv"}  # attn.to_q/k/v, attn.add_q/k/v_proj


def _param(module: str, param: str) -> str:
    """RMSNorm weights are ``scale`` in the release."""
    return "scale" if module.endswith("_norm") and param == "weight" else param


def _renamed(table: dict[str, str], name: str, key: str) -> str:
    """``table[name]``, or an error naming the weight no FLUX.2 release holds."""
    if name not in table:
        raise ValueError(f"{key} is not a weight of diffusers' Flux2Transformer2DModel, so it has no name in Black "
                         "Forest Labs' layout (merge adapters before exporting; is this another model's state?)")
    return table[name]


def flux2_transformer_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``Flux2Transformer2DModel`` state dict in the release's names (module docstring)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        double = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        single = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if double:
            block, module, param = double.groups()
            qkv = re.fullmatch(r"attn\.(to_|add_)([qkv])(_proj)?", module)
            if qkv:
                if qkv[2] == "q":
                    prefix, suffix = f"transformer_blocks.{block}.attn.{qkv[1]}", qkv[3] or ""
                    out[f"double_blocks.{block}.{FUSED[qkv[1]]}.{param}"] = torch.cat(
                        [state[f"{prefix}{p}{suffix}.{param}"] for p in "qkv"])
                continue
            name = _renamed(DOUBLE_BLOCK, module, key)
            out[f"double_blocks.{block}.{name}.{_param(name, param)}"] = value
        elif single:
            block, module, param = single.groups()
            name = _renamed(SINGLE_BLOCK, module, key)
            out[f"single_blocks.{block}.{name}.{_param(name, param)}"] = value
        elif key.startswith("norm_out.linear."):
            scale, shift = value.chunk(2, dim=0)  # diffusers' (scale, shift) -> the release's (shift, scale)
            out[key.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = torch.cat([shift, scale])
        else:
            prefix = next((p for p in TOP_LEVEL if key.startswith(p)), "")
            out[_renamed(TOP_LEVEL, prefix, key) + key[len(prefix):]] = value
    return out
