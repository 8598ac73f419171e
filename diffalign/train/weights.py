"""Weights of a run as safetensors: the final ones (a LoRA that ``pipe.load_lora_weights`` loads, or the
full denoiser as a diffusers sub-folder), and what a checkpoint keeps of the model (its trained weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import save_torch_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.diffusion import Backbone
from diffalign.diffusion.finetuned import LORA_FILE
from diffalign.errors import UserError
from diffalign.paths import with_usual_permissions

# diffusers' own names, so from_pretrained finds the file (or the index of its shards)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


def scale_folded_in(layers: dict[str, torch.Tensor], denoiser: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """LoRA weights with each layer's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) folded into B.

    A LoRA file has no standard place for alpha: loaders (diffusers without adapter metadata,
    ComfyUI, A1111, kohya tools) assume alpha = r, i.e. scale 1. Folded in, the adapter means what
    it trained as in every one of them, whatever ``train.lora_alpha`` was.
    """
    return {key: value * denoiser.get_submodule(key.split(".lora_B.")[0]).scaling[adapter] if ".lora_B." in key
            else value for key, value in layers.items()}


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
        return with_usual_permissions(folder)
    (adapter,) = denoiser.peft_config
    layers = scale_folded_in(get_peft_model_state_dict(denoiser, state_dict=weights), denoiser, adapter)
    renamed = convert_state_dict_to_diffusers(layers)
    # diffusers' names (to_q.lora.down, as its SD/SDXL scripts and DPO example write) cover only the
    # attention projections; with other targets (SD3's add_q_proj, ff.net.2) a file half in each
    # naming would confuse loaders, so it keeps peft's lora_A/lora_B, as diffusers' SD3 scripts write
    if not any(".lora_A." in key or ".lora_B." in key for key in renamed):
        layers = renamed
    saver = getattr(type(backbone.pipe), "save_lora_weights", None)
    if saver is None:  # pipelines without a LoRA loader (PixArt): the same file, written directly
        save_file({f"{backbone.denoiser_attr}.{k}": v.contiguous() for k, v in layers.items()}, folder / LORA_FILE)
    else:
        saver(str(folder), **{f"{backbone.denoiser_attr}_lora_layers": layers}, safe_serialization=True)
    return with_usual_permissions(folder)


def _trained_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def keep_trained_weights_only(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save-state pre-hook: each prepared model's checkpoint entry keeps its trained parameters only.

    accelerate writes a prepared model's whole state dict into every checkpoint. For a LoRA run that is the
    frozen base as well: SDXL's 2.6 B UNet parameters (4.8 GiB in bf16) beside 44 MiB of rank-8 adapters, at
    every checkpoint. The frozen weights are the base model's, which a resumed run loads anyway. FSDP and
    DeepSpeed save their models themselves and hand no entries here.
    """
    for i, (model, state) in enumerate(zip(models, weights)):
        trained = _trained_names(model)
        weights[i] = {key: value for key, value in state.items() if key in trained}


def load_trained_weights(models: list[nn.Module], input_dir: str) -> None:
    """accelerate's load-state pre-hook, the counterpart of :func:`keep_trained_weights_only`: loads each
    model's checkpoint entry (the trained parameters, or a whole state dict) into the unwrapped model and
    takes the models off accelerate's list. Keys saved through a DDP wrapper carry its ``module.`` prefix,
    so a checkpoint of N processes resumes on any number of them."""
    for i, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        target = extract_model_from_parallel(model)
        state = {key.removeprefix("module."): value for key, value in load_file(path).items()}
        unexpected = target.load_state_dict(state, strict=False).unexpected_keys
        missing = sorted(_trained_names(target) - state.keys())
        if unexpected or missing:
            raise UserError(f"{path} does not hold the trained weights of this model and LoRA settings "
                            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unknown, e.g. "
                            f"{unexpected[:2]}): load it with the model and LoRA settings of the run that wrote it")
    models.clear()
