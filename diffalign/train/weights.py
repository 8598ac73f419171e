"""The final weights of a run as safetensors: a LoRA that ``pipe.load_lora_weights`` loads, or the full denoiser
as a diffusers sub-folder. What a checkpoint keeps of the model is :mod:`diffalign.trained_weights`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import save_torch_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from diffalign.diffusion import Backbone
from diffalign.diffusion.experts import ExpertPair
from diffalign.diffusion.finetuned import LORA_FILE
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
    if isinstance(denoiser, ExpertPair):  # both experts: each saved as a run of that expert alone saves it
        for name, attr in ExpertPair.ATTRS.items():
            own = {key.removeprefix(f"{name}."): value for key, value in weights.items() if key.startswith(f"{name}.")}
            if not own:  # a state dict named otherwise would save an empty expert
                raise ValueError(f"the state dict holds no weights of the {name}-noise expert ({name}.*)")
            _save_denoiser(type(backbone.pipe), attr, getattr(denoiser, name), own, folder, lora=lora,
                           lora_folder=folder if attr == "transformer" else folder / attr)
        return with_usual_permissions(folder)
    _save_denoiser(type(backbone.pipe), backbone.denoiser_attr, denoiser, weights, folder, lora=lora,
                   lora_attr=backbone.lora_file_attr)
    return with_usual_permissions(folder)


def _save_denoiser(pipeline: type, attr: str, denoiser: nn.Module, weights: dict[str, torch.Tensor], folder: Path,
                   *, lora: bool, lora_attr: str = "transformer", lora_folder: Path | None = None) -> None:
    """One denoiser's weights under ``folder``: its full weights as the pipeline component ``attr`` (a diffusers
    sub-folder), or its LoRA as ``pipeline.save_lora_weights`` writes a ``lora_attr`` LoRA, in ``lora_folder``
    (default ``folder``). Both experts of one run: the low-noise one's LoRA goes in ``transformer_2/`` (diffusers
    keeps a Wan2.2 expert's LoRA as a transformer LoRA, loaded into the second expert with
    ``load_into_transformer_2``)."""
    folder = lora_folder if lora and lora_folder is not None else folder
    folder.mkdir(parents=True, exist_ok=True)
    if not lora:
        target = folder / attr
        denoiser.save_config(target)
        save_torch_state_dict(weights, target, filename_pattern=DIFFUSERS_WEIGHTS, max_shard_size="10GB")
        return
    (adapter,) = denoiser.peft_config
    layers = scale_folded_in(get_peft_model_state_dict(denoiser, state_dict=weights), denoiser, adapter)
    renamed = convert_state_dict_to_diffusers(layers)
    # diffusers' names (to_q.lora.down, as its SD/SDXL scripts and DPO example write) cover only the
    # attention projections; with other targets (SD3's add_q_proj, ff.net.2) a file half in each
    # naming would confuse loaders, so it keeps peft's lora_A/lora_B, as diffusers' SD3 scripts write
    if not any(".lora_A." in key or ".lora_B." in key for key in renamed):
        layers = renamed
    saver = getattr(pipeline, "save_lora_weights", None)
    if saver is None:  # pipelines without a LoRA loader (PixArt): the same file, written directly
        save_file({f"{attr}.{k}": v.contiguous() for k, v in layers.items()}, folder / LORA_FILE)
    else:
        saver(str(folder), **{f"{lora_attr}_lora_layers": layers}, safe_serialization=True)
