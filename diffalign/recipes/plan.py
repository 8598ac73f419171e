"""What a run will read, do and need, before it starts: ``diffalign train CONFIG --plan``.

"Will it fit?" is asked before renting a GPU, on a laptop that has neither the weights nor the data. The plan
says, for the config as resolved with its overrides: the method and its paper, whether the model and the data
are on this machine (and how to get them if not), the data's rows and the bad rows among the first ones read
(the same reading as ``diffalign data check``), the steps and examples the run will take, where it writes,
and the estimated peak memory per GPU from the same code as ``scripts/bench_memory.py``
(:mod:`diffalign.train.memory`). The estimate builds the model's architecture on the meta device with fake
storage, so it needs the model's configs only: a model that is not downloaded is estimated on the shipped
architecture of the same name (``assets/models/sdxl`` for ``stabilityai/stable-diffusion-xl-base-1.0``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from diffalign.data.check import check_dataset
from diffalign.data.named import named_scheme
from diffalign.diffusion.distilled import distilled_warning
from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.base import data_layout
from diffalign.paths import ASSETS, find_locally, how_to_get
from diffalign.recipes.index import how_to_make
from diffalign.train.config import Config, load_config, to_dict

# the Hub ids of the models the recipes train -> the shipped folder of that architecture's configs (no weights)
SHIPPED_ARCHITECTURES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3-medium",
    "stabilityai/stable-diffusion-3.5-medium": "sd35-medium", "stabilityai/stable-diffusion-3.5-large": "sd35-large",
    "black-forest-labs/FLUX.1-dev": "flux-dev", "black-forest-labs/FLUX.1-schnell": "flux-schnell",
    "PixArt-alpha/PixArt-XL-2-1024-MS": "pixart-alpha-1024", "Tongyi-MAI/Z-Image-Turbo": "z-image-turbo",
    "Qwen/Qwen-Image": "qwen-image", "black-forest-labs/FLUX.1-Kontext-dev": "flux-kontext-dev",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit", "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-plus",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image-edit-plus", "black-forest-labs/FLUX.2-dev": "flux2-dev",
    "black-forest-labs/FLUX.2-klein-4B": "flux2-klein-4b", "black-forest-labs/FLUX.2-klein-base-4B": "flux2-klein-4b",
    "black-forest-labs/FLUX.2-klein-9B": "flux2-klein-9b", "black-forest-labs/FLUX.2-klein-base-9B": "flux2-klein-9b",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan21-t2v-1.3b", "Wan-AI/Wan2.1-T2V-14B-Diffusers": "wan21-t2v-14b",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": "wan22-t2v-a14b", "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "wan22-ti2v-5b",
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": "wan21-i2v-14b-480p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": "wan21-i2v-14b-480p",
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": "wan22-i2v-a14b",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v": "hunyuanvideo15-480p-t2v",
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v": "hunyuanvideo15-480p-i2v",
}


def architecture_folder(model_path: str) -> tuple[Path | None, str]:
    """A folder holding ``model_path``'s configs to build it from, and where it came from; None when neither the
    model nor a shipped architecture of its name is on this machine."""
    local = find_locally(model_path)
    if local is not None and (local / "model_index.json").is_file():
        return local, f"{local}"
    shipped = SHIPPED_ARCHITECTURES.get(model_path)
    if shipped is not None:
        return ASSETS / "models" / shipped, f"the shipped architecture assets/models/{shipped} (configs, no weights)"
    return None, ""


def local_tokenizer(model_path: str) -> Any:
    """The tokenizer of a language model on this machine, to check token lengths as a run would; None if the model
    is not here."""
    from transformers import AutoTokenizer

    found = find_locally(model_path)
    return AutoTokenizer.from_pretrained(found) if found is not None else None


def _model_lines(config: Config) -> list[str]:
    path = config.model.path
    local = find_locally(path)
    found = f"model: {path} (on this machine: {local})" if local is not None else \
        f"model: {path}: not on this machine. {how_to_get(path)}."
    if OBJECTIVES[config.objective.name].family == "lm":  # a distilled language model is another matter
        return [found]
    return [found] + ([f"  {said}"] if (said := distilled_warning(path)) else [])


def _data_lines(config: Config, layout: str, rows: int) -> tuple[list[str], int | None]:
    """What the run reads, and its number of examples when known."""
    objective = OBJECTIVES[config.objective.name]
    if data_layout(objective) is None:
        source = config.online.prompts
        try:
            prompts = read_prompts(source)
        except UserError as err:
            return [f"prompts: {how_to_make(source) or err}"], None
        return [f"prompts: {source}: {len(prompts):,} prompts, e.g. {prompts[0][:100]!r}"], len(prompts)
    path = str(config.data.path)
    if find_locally(path, repo_type="dataset") is None and named_scheme(path) is None:  # toy:pairs, sign:pairs
        return [f"data: {path}: not on this machine. {how_to_make(path) or how_to_get(path, 'dataset') + '.'}"], None
    tokenizer = local_tokenizer(config.model.path) if layout.startswith("text_") else None
    report = check_dataset(config.data, layout, tokenizer=tokenizer, limit=rows, progress=False)
    return ["data: " + line if i == 0 else "  " + line for i, line in enumerate(report.lines())], report.rows


def _step_lines(config: Config, examples: int | None) -> list[str]:
    tc, objective = config.train, OBJECTIVES[config.objective.name]
    per_step = tc.batch_size * tc.gradient_accumulation
    unit = {"pairs": "pairs", "ranked": "ranked lists", "online": "samples"}.get(objective.dataset, "examples")
    split = tc.context_parallel
    who = "per GPU per step; with N GPUs, N times that" if split == 1 else \
        f"per group of {split} GPUs per step (each splits every sample's tokens); with N groups, N times that"
    lines = [f"steps: {tc.max_steps:,} optimiser steps of {tc.batch_size} x {tc.gradient_accumulation} "
             f"(batch x accumulation) = {per_step:,} {unit} {who}"]
    if objective.dataset == "online" and objective.samples_in_loss:
        lines.append(f"  each step samples its prompts inside the loss ({config.objective.sample_steps} steps, "
                     "gradients through some of them); no rounds are stored")
    elif objective.dataset == "online":
        oc = config.online
        rounds = math.ceil(tc.max_steps / oc.steps_per_round)
        group = objective.round_group_size(config)
        lines.append(f"  {rounds:,} rounds of {oc.groups_per_round} prompts x {group} samples, "
                     f"{oc.steps_per_round} optimiser steps each")
    elif examples:
        lines.append(f"  {tc.max_steps * per_step / examples:.2f} epochs of the {examples:,} rows on one GPU")
    every = f"every {tc.checkpoint_every} steps, the last {tc.checkpoints_keep} kept" if tc.checkpoint_every else "none"
    lines.append(f"writes: {config.output_dir} (checkpoints {every}; tracker {tc.report_to}"
                 + (f"; latent cache {config.data.cache_dir}" if config.data.cache_dir else "") + ")")
    return lines


def _memory_lines(config_path: str | Path, overrides: list[str], config: Config, gpus: tuple[int, ...]) -> list[str]:
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    from diffalign.train.memory import sharded_per_gpu, training_step_memory

    objective = OBJECTIVES[config.objective.name]
    if objective.family == "lm":
        return ["memory: not estimated for language models (scripts/bench_lm.py measures a step)"]
    if objective.samples_in_loss:
        return [f"memory: not estimated for {config.objective.name}, which samples and scores inside its loss"]
    folder, source = architecture_folder(config.model.path)
    if folder is None:
        return [f"memory: not estimated: neither {config.model.path} nor a shipped architecture of that name is on "
                "this machine (give model.path a folder holding its configs)"]
    estimated = load_config(config_path, [*overrides, f"model.path={folder}", "model.random_init=true",
                                          "model.compile=false"])
    if estimated.train.reference_dtype == "auto" and estimated.train.mixed_precision != "no":
        estimated.train.reference_dtype = estimated.train.mixed_precision  # what ``auto`` means on a GPU
    try:
        row = training_step_memory(estimated)
    except (DynamicOutputShapeException, DataDependentOutputException) as err:  # the step branches on values
        return [f"memory: not estimated: a step of {config.objective.name} depends on its data's values, which fake "
                f"tensors do not hold ({type(err).__name__}); scripts/bench_memory.py --measure measures it on a GPU"]
    table = " | ".join(f"{n} GPU{'s' if n > 1 else ''}: {sharded_per_gpu(row, n)['FSDP2']:.1f}" for n in gpus)
    split = config.train.context_parallel
    split = f", each sample's tokens split over {split} GPUs (train.context_parallel)" if split > 1 else ""
    return [f"memory: peak per GPU about {row['peak_gb']:.1f} GiB at batch {config.train.batch_size}{split}, estimated on "
            f"{source} (a lower bound: add 0.5-1 GiB of CUDA context)",
            f"  weights {row['weights_gb']:.2f}, trained {row['trained_weights_gb']:.3f} "
            f"({row['trained_params']:,} parameters), gradients {row['grads_gb']:.2f}, optimiser and EMA "
            f"{row['optimizer_and_ema_gb']:.2f}, activations {row['activations_gb']:.2f} GiB",
            f"  with FSDP2 (configs/accelerate/fsdp2.yaml), per GPU: {table}; scripts/bench_memory.py gives the full "
            "table (ZeRO, CPU offload) and the largest batch"] + _sampling_lines(config, row)


def _sampling_lines(config: Config, row: dict[str, float]) -> list[str]:
    """What an online run's rounds hold while they sample (:func:`diffalign.train.memory.training_step_memory`)."""
    if "sampling_gb" not in row:
        return []
    oc = config.online
    group = OBJECTIVES[config.objective.name].round_group_size(config)
    return [f"  sampling: {row['sampling_gb']:.1f} GiB while a round samples and decodes {oc.sample_batch_size} "
            f"group{'s' if oc.sample_batch_size > 1 else ''} of {group} (online.sample_batch_size), reward models "
            "not counted"]


def plan_lines(config_path: str | Path, overrides: list[str] | None = None, *, rows: int = 256,
               memory: bool = True, gpus: tuple[int, ...] = (1, 8)) -> list[str]:
    """The plan of ``config_path`` with ``overrides``: what the run reads, does, writes and needs (see the module
    docstring), then the resolved config. ``rows``: how many rows of the data to read for bad ones."""
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    objective = OBJECTIVES[config.objective.name]
    layout = data_layout(objective) or "online"
    lines = [f"plan of {config_path}{' ' + ' '.join(overrides) if overrides else ''}",
             f"method: {config.objective.name} ({objective.paper}); loss {config.objective.loss}"]
    lines += _model_lines(config)
    data, examples = _data_lines(config, layout, rows)
    lines += data
    lines += _step_lines(config, examples)
    if memory:
        lines += _memory_lines(config_path, overrides, config, gpus)
    resolved = {key: value for key, value in to_dict(config).items() if key != "given_keys"}
    lines += ["", "the resolved config (every key, defaults included):",
              yaml.safe_dump(resolved, sort_keys=False).rstrip()]
    return lines

