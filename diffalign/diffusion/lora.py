"""LoRA adapters on any denoiser, and running it as its base (the reference) for free."""

from __future__ import annotations

import contextlib

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(
    denoiser: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Add LoRA (rank r, scale alpha/r) to the attention projections of a UNet or DiT.

    Uses diffusers' PEFT integration when the model has it (so ``save_lora_weights`` and
    ``load_lora_weights`` round-trip), else peft's ``inject_adapter_in_model`` (PixArt).
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=target_modules or ATTENTION_TARGETS,
    )
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    return denoiser


def lora_layers(module: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(module: nn.Module) -> bool:
    return bool(lora_layers(module))


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """Run a LoRA-adapted module as its base model, then switch the adapters back on."""
    layers = lora_layers(module)
    if not layers:
        raise ValueError(
            "no reference model: pass a frozen reference denoiser, or train LoRA adapters so that "
            "the base with adapters disabled serves as the reference"
        )
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
