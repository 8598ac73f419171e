"""Final weights of a run as safetensors: a LoRA that ``pipe.load_lora_weights`` loads, or the
full denoiser as a diffusers sub-folder."""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from diffalign.diffusion import Backbone

LORA_FILE = "pytorch_lora_weights.safetensors"


def save_final_weights(backbone: Backbone, denoiser: nn.Module, folder: Path, *, lora: bool) -> Path:
    """Write the trained weights under ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    if not lora:
        denoiser.save_pretrained(folder / backbone.denoiser_attr, safe_serialization=True)
        return folder
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    saver = getattr(type(backbone.pipe), "save_lora_weights", None)
    if saver is None:  # pipelines without a LoRA loader (PixArt): the same file, written directly
        save_file({f"{backbone.denoiser_attr}.{k}": v.contiguous() for k, v in layers.items()}, folder / LORA_FILE)
    else:
        saver(str(folder), **{f"{backbone.denoiser_attr}_lora_layers": layers}, safe_serialization=True)
    return folder
