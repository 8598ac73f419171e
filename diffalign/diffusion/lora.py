"""LoRA adapters on any denoiser, and running it as its base (the reference) for free.

Denoisers whose diffusers pipeline has a LoRA loader (SD, SDXL, SD3) load adapters through it. For
the others (PixArt) :func:`load_lora_file` and :func:`merge_lora` do the same with peft, from a file
in diffusers' layout (``transformer.<module>.lora.down/up.weight``) whose scale is folded into the
up weights, as diffalign saves them, so alpha = rank.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
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


@contextlib.contextmanager
def reference_denoiser(denoiser: nn.Module, reference: nn.Module | None):
    """The frozen reference to run: ``reference`` when given (a frozen copy), else ``denoiser`` with its LoRA
    adapters disabled (:func:`adapters_disabled`), switched back on afterwards."""
    if reference is not None:
        yield reference
        return
    with adapters_disabled(denoiser) as base:
        yield base


def load_lora_file(denoiser: nn.Module, path: Path, prefix: str) -> nn.Module:
    """Add the adapter of a diffusers-layout LoRA file (scale folded in) to ``denoiser``."""
    layers = {k.removeprefix(f"{prefix}."): v for k, v in load_file(str(path)).items() if k.startswith(f"{prefix}.")}
    if not layers:
        raise ValueError(f"{path} holds no LoRA layers of the {prefix}")
    peft_layers = convert_unet_state_dict_to_peft(layers)
    rank = next(v.shape[0] for k, v in peft_layers.items() if "lora_A" in k)
    targets = sorted({k.split(".lora_")[0] for k in peft_layers})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), denoiser)
    set_peft_model_state_dict(denoiser, peft_layers)
    return denoiser


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``module`` into its base weight and put the plain base layer back."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return module
