"""Z-Image's transformer in the layout Tongyi-MAI release it (``z_image_turbo_bf16.safetensors``, which ComfyUI's
diffusion-model loader and diffusers' ``ZImageTransformer2DModel.from_single_file`` read): the inverse of diffusers'
``convert_z_image_transformer_checkpoint_to_diffusers``. Each attention's q, k and v projections are one fused
``attention.qkv`` (stacked in that order), its output ``attention.out``, its norms ``q_norm``/``k_norm``, and the
patch embedder and final layer of the one patch size are ``x_embedder``/``final_layer``."""

from __future__ import annotations

import re

import torch

Tensor = torch.Tensor
RENAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
           (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
           (".attention.norm_q.", ".attention.q_norm."))


def z_image_transformer_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``ZImageTransformer2DModel`` state dict in the release's names (module docstring)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        fused = re.fullmatch(r"(.*\.attention)\.to_([qkv])\.weight", key)
        if fused:
            if fused[2] == "q":
                out[f"{fused[1]}.qkv.weight"] = torch.cat([state[f"{fused[1]}.to_{p}.weight"] for p in "qkv"])
            continue
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out
