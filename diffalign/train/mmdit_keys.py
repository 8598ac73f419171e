"""Diffusers SD3 transformer -> original MMDiT key names, for SD3 / SD3.5 single-file checkpoints.

Stability's SD3 checkpoints (``sd3_medium.safetensors``, ``sd3.5_medium.safetensors``, the files
ComfyUI's checkpoint loader and diffusers' ``from_single_file`` read) store the denoiser under
``model.diffusion_model.`` in the names of the reference MMDiT: ``joint_blocks.i.x_block`` (image
stream) and ``joint_blocks.i.context_block`` (text stream), each with one fused ``attn.qkv``
projection, ``adaLN_modulation.1`` and ``mlp.fc1/fc2``; SD3.5's extra image self-attention as
``x_block.attn2`` and its RMS norms as ``ln_q``/``ln_k``; the embedders as ``x_embedder``,
``t_embedder``, ``y_embedder`` and the head as ``final_layer``.

One detail is not a rename. The reference's continuous adaptive norm (the last block's text
stream, which only feeds attention, and the final layer) splits its projection into (shift,
scale); diffusers' ``AdaLayerNormContinuous`` splits it into (scale, shift). Those two projections
have their halves swapped back. The text encoders keep their Hugging Face names under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (:data:`TEXT_ENCODER_PREFIXES`), and the VAE
takes the LDM names of :func:`diffalign.train.ldm_keys.vae_to_ldm`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

TEXT_ENCODER_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                         "text_encoder_2": "text_encoders.clip_g.transformer.",
                         "text_encoder_3": "text_encoders.t5xxl.transformer."}

_TOP_LEVEL = (("pos_embed.pos_embed", "pos_embed"), ("pos_embed.proj.", "x_embedder.proj."),
              ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
              ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
              ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
              ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
              ("context_embedder.", "context_embedder."), ("proj_out.", "final_layer.linear."),
              ("norm_out.linear.", "final_layer.adaLN_modulation.1."))
_IN_BLOCK = (("norm1.linear.", "x_block.adaLN_modulation.1."),
             ("norm1_context.linear.", "context_block.adaLN_modulation.1."),
             ("attn.to_out.0.", "x_block.attn.proj."), ("attn.to_add_out.", "context_block.attn.proj."),
             ("attn.norm_q.", "x_block.attn.ln_q."), ("attn.norm_k.", "x_block.attn.ln_k."),
             ("attn.norm_added_q.", "context_block.attn.ln_q."), ("attn.norm_added_k.", "context_block.attn.ln_k."),
             ("attn2.to_out.0.", "x_block.attn2.proj."), ("attn2.norm_q.", "x_block.attn2.ln_q."),
             ("attn2.norm_k.", "x_block.attn2.ln_k."),
             ("ff.net.0.proj.", "x_block.mlp.fc1."), ("ff.net.2.", "x_block.mlp.fc2."),
             ("ff_context.net.0.proj.", "context_block.mlp.fc1."), ("ff_context.net.2.", "context_block.mlp.fc2."))
# separate q, k, v projections (``{}`` is q, k or v) -> the fused projection, rows stacked q, k, v
_FUSED_QKV = (("attn.to_{}.", "x_block.attn.qkv."), ("attn.add_{}_proj.", "context_block.attn.qkv."),
              ("attn2.to_{}.", "x_block.attn2.qkv."))


def _swap_halves(value: Tensor) -> Tensor:
    """(scale, shift) rows -> (shift, scale): the same swap undoes itself."""
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_transformer_to_mmdit(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in the reference MMDiT's names.

    Raises ``KeyError`` for a key it has no original name for, so a new diffusers parameter
    cannot be dropped from an export unnoticed.
    """
    state = dict(state)
    out: dict[str, Tensor] = {}
    layers = config["num_layers"]
    for i in range(layers):
        source, target = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for pattern, fused in _FUSED_QKV:
            for kind in ("weight", "bias"):
                parts = [source + pattern.format(p) + kind for p in ("q", "k", "v")]
                if parts[0] in state:
                    out[target + fused + kind] = torch.cat([state.pop(key) for key in parts])
    for key, value in state.items():
        block, rest, rules = "", key, _TOP_LEVEL
        if key.startswith("transformer_blocks."):
            _, index, rest = key.split(".", 2)
            block, rules = f"joint_blocks.{index}.", _IN_BLOCK
        for old, new in rules:
            if rest.startswith(old):
                out[block + new + rest[len(old):]] = value
                break
        else:
            raise KeyError(f"no original MMDiT name for {key!r}")
    for kind in ("weight", "bias"):
        for key in (f"joint_blocks.{layers - 1}.context_block.adaLN_modulation.1.{kind}",
                    f"final_layer.adaLN_modulation.1.{kind}"):
            out[key] = _swap_halves(out[key])
    return out
