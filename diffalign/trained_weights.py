"""What a checkpoint keeps of a model: its trained parameters only (a LoRA run's adapters, not its frozen base), and
how they are read back, into a resumed run or into a model evaluated at that checkpoint. The trainer and the
loading of a finished run's checkpoint (:mod:`diffalign.diffusion.finetuned`) both use it, so it sits below both."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from safetensors.torch import load_file
from torch import nn

from diffalign.errors import UserError
from diffalign.sharded import SHARDED_STATE


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
    so a checkpoint of N processes resumes on any number of them. An FSDP2 run's checkpoint holds its weights in
    ``sharded_state/``, which the trainer reads itself (:func:`~diffalign.train.fsdp2.load_sharded`)."""
    if (Path(input_dir) / SHARDED_STATE).is_dir():
        models.clear()
        return
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
