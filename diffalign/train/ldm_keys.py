"""Diffusers -> original (LDM / "single-file") key names, for checkpoints ComfyUI and A1111 load.

Stable Diffusion 1.x/2.x and SDXL checkpoints in the original layout store every component in
one file under fixed prefixes: the UNet under ``model.diffusion_model.`` (``input_blocks``,
``middle_block``, ``output_blocks``), the VAE under ``first_stage_model.`` (``encoder.down.i.block.j``,
``mid.block_1``, ...), the text encoders under ``cond_stage_model.transformer.`` (SD1, Hugging Face
CLIP names) or ``conditioner.embedders.{0,1}.`` (SDXL; the second is OpenCLIP-named, with fused
q/k/v projections). The renaming rules are derived from each model's config, so any block count
or ``layers_per_block`` converts. diffusers' own single-file loader reads the result back: the
tests round-trip through it.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

DENOISER_PREFIX = "model.diffusion_model."  # the UNet, or the MMDiT in SD3 files
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))


def _rename(state: Mapping[str, Tensor], blocks: list[tuple[str, str, tuple]]) -> dict[str, Tensor]:
    """Apply (diffusers prefix, ldm prefix, inner renames) rules; every key must match one rule."""
    out = {}
    for key, value in state.items():
        for source, target, inner in blocks:
            if key.startswith(source):
                rest = key[len(source):]
                for old, new in inner:
                    if rest.startswith(old):
                        rest = new + rest[len(old):]
                        break
                out[target + rest] = value
                break
        else:
            raise KeyError(f"no original-layout name for {key!r}")
    return out


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM ``openaimodel.UNetModel`` names."""
    per_block = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    rules: list[tuple[str, str, tuple]] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(levels):
        for j in range(per_block):
            k = i * (per_block + 1) + j + 1
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", ())]
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_block + 1)}.0.op.", ()))
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per_block + 1):
            k = i * (per_block + 1) + j
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", ())]
        last = i * (per_block + 1) + per_block
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last}.{2 if has_attention else 1}.", ()))
    return _rename(state, rules)


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """A diffusers AutoencoderKL state dict in LDM ``AutoencoderKL`` names (attention as 1x1 convs)."""
    levels = len(config["block_out_channels"])
    rules: list[tuple[str, str, tuple]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", ()), ("decoder.conv_norm_out.", "decoder.norm_out.", ()),
    ]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", ()),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", ()),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION),
                  (f"{part}.conv_in.", f"{part}.conv_in.", ()), (f"{part}.conv_out.", f"{part}.conv_out.", ())]
    for i in range(levels):
        rules += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", ()),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.", ()),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.", ())]
    rules += [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    out = _rename(state, rules)
    out = {k.replace(".conv_shortcut.", ".nin_shortcut."): v for k, v in out.items()}
    # the original attention uses 1x1 convolutions where diffusers uses linear layers
    return {k: v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v
            for k, v in out.items()}


def clip_text_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face CLIP text-model keys in their long-standing ``text_model.*`` form.

    transformers >= 5.6 flattened ``CLIPTextModel`` (``embeddings.*`` instead of
    ``text_model.embeddings.*``); original checkpoints and their loaders use the long form.
    """
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def clip_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face CLIPTextModelWithProjection state dict in OpenCLIP names (SDXL's second encoder)."""
    state = clip_text_keys(state)
    out: dict[str, Tensor] = {}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    return out
