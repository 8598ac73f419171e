"""Final weights of a run as safetensors: a LoRA that ``pipe.load_lora_weights`` loads, or the
full denoiser as a diffusers sub-folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import save_torch_state_dict
from peft.utils import get_peft_model_state_dict
from torch import nn

from diffalign.diffusion import Backbone
from diffalign.diffusion.lora import save_lora_file

LORA_FILE = "pytorch_lora_weights.safetensors"
# diffusers' own names, so from_pretrained finds the file (or the index of its shards)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


def save_final_weights(backbone: Backbone, denoiser: nn.Module, weights: dict[str, torch.Tensor], folder: Path,
                       *, lora: bool) -> Path:
    """Write the trained weights under ``folder``; returns it.

    ``denoiser`` is the unwrapped module (for its config and adapter names) and ``weights`` its
    complete state dict, which the caller gathers with ``accelerator.get_state_dict``: under FSDP
    or ZeRO-3 the module on any one process holds only a shard, so its own ``state_dict`` is not
    the model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not lora:
        target = folder / backbone.denoiser_attr
        denoiser.save_config(target)
        save_torch_state_dict(weights, target, filename_pattern=DIFFUSERS_WEIGHTS, max_shard_size="10GB")
        return folder
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, state_dict=weights))
    # the adapter's config (rank, alpha, targets) goes into the file's metadata: without it loaders
    # assume alpha = rank, and a run with train.lora_alpha != rank would load at the wrong scale
    attr, (adapter,) = backbone.denoiser_attr, denoiser.peft_config
    saver = getattr(type(backbone.pipe), "save_lora_weights", None)
    if saver is None:  # pipelines without a LoRA loader (PixArt): the same file, written with peft
        save_lora_file(layers, denoiser.peft_config[adapter], folder / LORA_FILE, prefix=attr)
    else:
        saver(str(folder), **{f"{attr}_lora_layers": layers,
                              f"{attr}_lora_adapter_metadata": denoiser.peft_config[adapter].to_dict()},
              safe_serialization=True)
    return folder
