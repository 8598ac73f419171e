"""Load what training produced: a run directory, one of its checkpoints, a LoRA file or folder, or a
diffusers folder.

A run directory (``diffalign train``'s ``output_dir``) knows its base model from its
``config.yaml``; its ``final/`` holds either a LoRA (``pytorch_lora_weights.safetensors``) or
the full denoiser as a diffusers sub-folder. The base is loaded exactly as training loaded it
(including ``random_init`` and its seed), then the trained weights go on top. A checkpoint
(``run/checkpoints/step-N``) holds the trained parameters as the run left them at step N (its LoRA
layers, or the whole denoiser), so a run can be evaluated part-way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml
from diffusers import DiffusionPipeline
from torch import nn

from diffalign.diffusion.experts import ExpertPair
from diffalign.diffusion.loading import MODEL_INDEX, cast_to, load_pipeline, resolve_dtype, without_diffusers_noise
from diffalign.diffusion.lora import add_lora, load_lora_file
from diffalign.paths import resolve_model_path
from diffalign.errors import UserError

if TYPE_CHECKING:
    from diffalign.diffusion.backbones import Backbone

LORA_FILE = "pytorch_lora_weights.safetensors"


def _denoiser_attr(pipe: DiffusionPipeline, config: dict | None = None) -> str:
    """The pipeline component a run trained: its UNet or transformer, or the expert its ``model.expert`` names
    (Wan2.2 A14B's low-noise expert is ``transformer_2``)."""
    if config is not None and config["model"].get("expert") == "low":
        return "transformer_2"
    return "unet" if getattr(pipe, "unet", None) is not None else "transformer"


def _denoiser_attrs(pipe: DiffusionPipeline, config: dict) -> list[str]:
    """The pipeline components a run trained: :func:`_denoiser_attr`'s, or both experts (``model.expert=both``)."""
    if config["model"].get("expert") == "both":
        return list(ExpertPair.ATTRS.values())
    return [_denoiser_attr(pipe, config)]


def _base_of_run(config: dict, torch_dtype) -> DiffusionPipeline:
    """The base model as the run (its parsed ``config.yaml``) loaded it."""
    model, seed = config["model"], config["train"]["seed"]
    return load_pipeline(model["path"], config=model.get("config"), denoiser_file=model.get("denoiser_file"),
                         random_init=model.get("random_init", False), seed=seed, torch_dtype=torch_dtype,
                         variant=model.get("variant"))


def apply_weights(pipe: DiffusionPipeline, weights: Path, torch_dtype: torch.dtype | None = None,
                  attr: str | None = None) -> DiffusionPipeline:
    """Put trained weights on ``pipe``: a LoRA file/folder, or a folder holding ``unet/``/``transformer/`` (or
    ``attr/``: the component a run trained, ``transformer_2`` for Wan2.2's low-noise expert, whose LoRA diffusers
    keeps as a transformer LoRA loaded ``load_into_transformer_2``)."""
    weights = Path(weights)
    attr = attr or _denoiser_attr(pipe)
    lora_file = _lora_file(weights)
    if attr == "transformer_2" and _lora_file(weights / attr).is_file():  # a run of both experts keeps the low-noise
        lora_file = _lora_file(weights / attr)                            # one's LoRA in transformer_2/
    if lora_file.is_file():
        if hasattr(pipe, "load_lora_weights"):
            into = {"load_into_transformer_2": True} if attr == "transformer_2" else {}
            with without_diffusers_noise():
                pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, **into)
        else:  # PixArt: diffusers has no LoRA loader for it
            load_lora_file(getattr(pipe, attr), lora_file, prefix=attr)
        return pipe
    if (weights / attr).is_dir():
        cls = type(getattr(pipe, attr))
        try:
            with without_diffusers_noise():
                model = cls.from_pretrained(weights / attr, use_safetensors=True, torch_dtype=torch_dtype).eval()
        except OSError as err:  # no safetensors weights there (diffalign never unpickles .bin files)
            raise UserError(f"cannot load the trained {attr} in {weights / attr}: {err}") from None
        pipe.register_modules(**{attr: model})
        return pipe
    raise UserError(f"{weights} holds neither {LORA_FILE} nor a {attr}/ folder of trained weights")


def _lora_file(weights: Path) -> Path:
    """Where a LoRA is in ``weights``: the file itself, or the diffusers-named file in the folder."""
    return weights if weights.is_file() else weights / LORA_FILE


PipelineLoader = Callable[[], DiffusionPipeline]


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one of a run's checkpoints (``run/checkpoints/step-N``, its run's config two levels up)."""
    return (path / "trainer_state.json").is_file() and (path.parent.parent / "config.yaml").is_file()


def is_finished_run(path: Path) -> bool:
    """Whether ``path`` is a finished run directory: its ``config.yaml`` and its ``final/`` weights."""
    return (path / "config.yaml").is_file() and (path / "final").is_dir()


def _checkpoint_loader(checkpoint: Path, base: Path | None, torch_dtype: torch.dtype | None,
                       base_variant: str | None) -> PipelineLoader:
    """A run's checkpoint on its base (or on ``base``): the run's LoRA layers, as it configured them, then the
    checkpoint's trained parameters. A run with an EMA is evaluated at its raw weights here (its final
    weights are the averaged ones)."""
    from diffalign.trained_weights import load_trained_weights  # the checkpoint format is the trainer's

    config = yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())
    if not (checkpoint / "model.safetensors").is_file():
        raise UserError(f"{checkpoint} holds no model.safetensors (a checkpoint of an FSDP or DeepSpeed run keeps "
                        "its own shards); use the run's final weights instead")
    if base is None:
        resolve_model_path(config["model"]["path"], what=f"the base model of {checkpoint}")

    def load() -> DiffusionPipeline:
        pipe = _base_of_run(config, torch_dtype) if base is None else \
            load_pipeline(base, torch_dtype=torch_dtype, variant=base_variant)
        train = config["train"]
        if config["model"].get("expert") == "both":  # named as the run's ExpertPair names them (high., low.)
            denoiser = ExpertPair(pipe.transformer, pipe.transformer_2, boundary=0.0)
        else:
            denoiser = getattr(pipe, _denoiser_attr(pipe, config))
        if train["lora_rank"] > 0:
            add_lora(denoiser, train["lora_rank"], alpha=train.get("lora_alpha"),
                     target_modules=list(train["lora_targets"]))
        load_trained_weights([denoiser], str(checkpoint))
        return pipe

    return load


def _language_model_run(run: Path) -> str | None:
    """The objective of ``run`` when it trained a language model (its name starts with ``lm_``), else None."""
    try:
        name = str(yaml.safe_load((run / "config.yaml").read_text())["objective"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return name if name.startswith("lm_") else None


def finetuned_loader(source: str | Path, *, base: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                     base_variant: str | None = None, variant: str | None = None) -> PipelineLoader:
    """What :func:`load_finetuned` loads, checked now and loaded when the returned function is called.

    Every path is resolved and every file the load needs is looked for here, so a command that
    loads several models one after another (``diffalign eval``, ``generate-ranked``) names a
    mistake in the last of them before it spends an hour on the first.
    """
    source = resolve_model_path(source, what="model")
    if is_checkpoint(source):
        base = None if base is None else resolve_model_path(base, what="the base model")
        return _checkpoint_loader(source, base, torch_dtype, base_variant)
    is_run = is_finished_run(source)
    if not is_run and (source / MODEL_INDEX).is_file():
        return lambda: load_pipeline(source, torch_dtype=torch_dtype, variant=variant)
    if not is_run and base is None:
        raise UserError(f"{source} is not a run directory or a diffusers folder; to apply it as a LoRA or "
                        "denoiser, also give the base model")
    weights = source / "final" if is_run else source
    if not (_lora_file(weights).is_file()
            or any((weights / attr).is_dir() for attr in ("unet", "transformer", "transformer_2"))):
        if is_run and _language_model_run(source):
            raise UserError(f"{source} is a language-model run ({_language_model_run(source)}), not a diffusion "
                            "model; compare it with the language model it trained from, a causal-LM --base: "
                            f"diffalign eval --base MODEL --aligned {source} --prompts PROMPTS --out OUT")
        raise UserError(f"{weights} holds neither {LORA_FILE} nor a unet/ or transformer/ folder of trained weights")
    if base is None:  # the run's own base, loaded as it trained
        config = yaml.safe_load((source / "config.yaml").read_text())
        resolve_model_path(config["model"]["path"], what=f"the base model of {source}")

        def load_run() -> DiffusionPipeline:
            pipe = _base_of_run(config, torch_dtype)
            for attr in _denoiser_attrs(pipe, config):
                apply_weights(pipe, weights, torch_dtype, attr)
            return pipe

        return load_run
    base = resolve_model_path(base, what="the base model")
    return lambda: apply_weights(load_pipeline(base, torch_dtype=torch_dtype, variant=base_variant), weights,
                                 torch_dtype)


def load_finetuned(source: str | Path, *, base: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                   base_variant: str | None = None, variant: str | None = None) -> DiffusionPipeline:
    """A pipeline with trained weights from a run directory, a LoRA (with ``base``), or a pipeline folder.

    A LoRA or pipeline may also be given by the Hub id of its copy in the local Hugging Face cache.
    ``base_variant`` is the weights variant of ``base`` (``"fp16"``; a run's own base loads as it
    trained), ``variant`` that of ``source`` when it is itself a diffusers folder.
    """
    return finetuned_loader(source, base=base, torch_dtype=torch_dtype, base_variant=base_variant, variant=variant)()


def _architecture(denoiser: nn.Module) -> dict:
    """A denoiser's config without diffusers' bookkeeping (``_name_or_path``, ``_diffusers_version``, ...), as JSON
    reads it back (a tuple and a list of the same values are one setting)."""
    return json.loads(json.dumps({k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}))


def load_frozen_denoiser(source: str, backbone: "Backbone", device: torch.device, dtype: str, *, what: str,
                         same_config: bool) -> nn.Module:
    """The denoiser of ``source`` (a diffusers folder or a finished run, :func:`load_finetuned`), frozen, in ``dtype``
    (a ``train.reference_dtype`` name) on ``device``: ``model.reference`` of a diffusion run (``same_config``: the
    trained model's architecture exactly) or a distillation teacher (the same denoiser class, any size). Refused,
    naming ``what``, when it cannot stand in for the trained denoiser."""
    pipe = load_finetuned(source)
    if type(pipe) is not type(backbone.pipe):
        raise UserError(f"{what}={source} is a {type(pipe).__name__}; the trained model is a "
                        f"{type(backbone.pipe).__name__}: they must share the latents and the prompt conditioning")
    attr = backbone.denoiser_attr
    denoiser, trained = getattr(pipe, attr, None), backbone.denoiser
    if type(denoiser) is not type(trained) or (same_config and _architecture(denoiser) != _architecture(trained)):
        raise UserError(f"{what}={source}: its {attr} ({type(denoiser).__name__}) is not the trained model's "
                        f"architecture ({type(trained).__name__}{' with the same config' if same_config else ''})")
    denoiser = denoiser.requires_grad_(False).eval()
    return cast_to(denoiser.to(device), resolve_dtype(dtype, device))
