"""The models of a run: the pipeline's backbone (LoRA or full weights trained) and the frozen reference.

One function, so the trainer and the memory estimate (``scripts/bench_memory.py``, which
builds the same models on the meta device) cannot drift apart.
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import cast_training_params
from torch import nn

from diffalign.diffusion import (
    Backbone,
    add_lora,
    backbone_for,
    cast_to,
    check_sources,
    configure_denoiser,
    load_pipeline,
    mixed_precision_dtype,
    resolve_dtype,
)
from diffalign.diffusion.finetuned import load_frozen_denoiser
from diffalign.errors import UserError
from diffalign.train.config import Config


def build_models(config: Config, device: torch.device, frozen_reference: bool) -> tuple[Backbone, nn.Module | None]:
    """Load the pipeline, freeze what is not trained and place everything on ``device``.

    Text encoders are kept in the mixed-precision dtype and the VAE in fp32. Trained weights
    are fp32 master weights (accelerate autocasts the forward). With ``train.lora_rank`` > 0
    only the adapters train: the frozen base is stored in the mixed-precision dtype too (half
    the memory of fp32; autocast computes in that dtype anyway), as diffusers' LoRA examples
    do, and the reference is the same module with adapters disabled, so no reference copy
    exists. A full fine-tune keeps a frozen copy of the base in ``train.reference_dtype``
    when the objective compares against it. ``model.reference`` replaces the base as that reference (LoRA runs too):
    another model of the same architecture, loaded frozen. Returns the backbone and the reference (or None).
    """
    mc, tc = config.model, config.train
    weight_dtype = mixed_precision_dtype(tc.mixed_precision)
    pipe = load_pipeline(mc.path, config=mc.config, denoiser_file=mc.denoiser_file,
                         random_init=mc.random_init, seed=tc.seed, variant=mc.variant)
    backbone = backbone_for(pipe, distilled_guidance=mc.distilled_guidance, frames=config.data.frames,
                           expert=mc.expert, prompt_tokens=mc.prompt_tokens)
    check_sources(backbone, config.data.source_columns, config.validation.every)
    denoiser = backbone.denoiser
    for name, module in backbone.frozen_components().items():
        cast_to(module.requires_grad_(False).to(device), weight_dtype if name != "vae" else torch.float32)
    configure_denoiser(denoiser, attention=mc.attention, gradient_checkpointing=mc.gradient_checkpointing,
                       channels_last=mc.channels_last)
    reference = None
    if mc.reference is not None and frozen_reference:  # another model than the base (a previous stage's policy)
        if device.type == "meta":  # a memory estimate: the other model has the base's architecture, which stands in
            reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
            cast_to(reference, resolve_dtype(tc.reference_dtype, device))
        else:
            reference = load_frozen_denoiser(mc.reference, backbone, device, tc.reference_dtype,
                                             what="model.reference", same_config=True)
    if tc.lora_rank > 0:
        cast_to(denoiser.requires_grad_(False), weight_dtype)
        try:
            add_lora(denoiser, tc.lora_rank, alpha=tc.lora_alpha, target_modules=list(tc.lora_targets))
        except ValueError as err:  # peft: a target that names no module of this denoiser
            raise UserError(f"train.lora_targets={list(tc.lora_targets)}: {err}") from None
        cast_training_params(denoiser, dtype=torch.float32)
    elif frozen_reference and reference is None:  # a full fine-tune compares against a frozen copy of the base
        reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
        cast_to(reference.to(device), resolve_dtype(tc.reference_dtype, device))
    denoiser.to(device).train()
    if mc.compile:  # after LoRA, so the compiled graph includes the adapters
        denoiser.compile()
    return backbone, reference
