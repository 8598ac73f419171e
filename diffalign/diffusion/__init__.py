"""Diffusion side of "likelihood proxy + core loss": backbone adapters over diffusers models,
noise schedules and targets, the denoising-likelihood proxy, and latent/prompt caching."""

from diffalign.diffusion.backbones import (
    BACKBONES,
    Backbone,
    Conditioning,
    backbone_for,
    check_sources,
    configure_denoiser,
)
from diffalign.diffusion.cache import CachedEncoder, TensorCache, content_key
from diffalign.diffusion.inversion import ddim_invert, ddim_sample
from diffalign.diffusion.likelihood import (
    NoisedGroup,
    denoising_scores,
    group_scores,
    location_scores,
    noised_group,
)
from diffalign.diffusion.loading import (
    DTYPES,
    build_random_pipeline,
    cast_to,
    default_device,
    load_pipeline,
    mixed_precision_dtype,
    process_state,
    resolve_dtype,
)
from diffalign.diffusion.lora import adapters_disabled, add_lora, has_lora, reference_denoiser
from diffalign.diffusion.schedule import (
    DiffusionSchedule,
    FlowSchedule,
    Schedule,
    TimestepSampler,
    schedule_for,
)

__all__ = [
    "DTYPES",
    "default_device",
    "mixed_precision_dtype",
    "process_state",
    "resolve_dtype",
    "BACKBONES",
    "Backbone",
    "CachedEncoder",
    "Conditioning",
    "DiffusionSchedule",
    "FlowSchedule",
    "NoisedGroup",
    "Schedule",
    "TensorCache",
    "TimestepSampler",
    "adapters_disabled",
    "reference_denoiser",
    "add_lora",
    "backbone_for",
    "check_sources",
    "build_random_pipeline",
    "cast_to",
    "configure_denoiser",
    "content_key",
    "ddim_invert",
    "ddim_sample",
    "denoising_scores",
    "group_scores",
    "location_scores",
    "has_lora",
    "load_pipeline",
    "noised_group",
    "schedule_for",
]
