"""Validation of a run config with what it names: its objective, loss, rewards and data rules.

:mod:`diffalign.config` holds the schema (and sits below the objectives, which import their types from it);
this module, one layer above the objectives, checks a config against them before any model loads. The
rules of one method are that method's own (its options' ranges and choices, and its ``check_config``);
what is checked here spans sections or concerns every method alike.
"""

from __future__ import annotations

import copy
import difflib
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

from diffalign.config.bounds import check_bounds
from diffalign.config.schema import (  # noqa: F401 - the schema, re-exported where the trainer's users find it
    MOVED_KEYS,
    Config,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OnlineConfig,
    TrainConfig,
    ValidationConfig,
    read_config,
    save_config,
    to_dict,
)
from diffalign.errors import UserError
from diffalign.losses.registry import LossSpec
from diffalign.rewards.weighted import reward_names


def validate(config: Config) -> Config:
    """Check choices and cross-field rules of a run config with its objective and loss; raises :class:`UserError`
    naming the key."""
    from diffalign import losses
    from diffalign.objectives import OBJECTIVES

    def choose(key: str, value: Any, choices) -> None:
        if value not in choices:
            raise UserError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")

    check_bounds(config)
    choose("objective.name", config.objective.name, sorted(OBJECTIVES))
    objective = OBJECTIVES[config.objective.name]
    if objective.family == "lm":
        _language_model_defaults(config)
    own = getattr(objective, "own_losses", None)  # objectives whose losses are not preference losses
    if own:
        choose("objective.loss", config.objective.loss, own)
        kind = objective.loss_kinds[0]
    else:
        try:
            kind = losses.spec(config.objective.loss).kind
        except losses.UnknownLossError as err:
            raise UserError(f"objective.loss: {err}") from None
    accepted = objective.loss_kinds
    if kind not in accepted:
        names = [s.name for s in losses.specs() if s.kind in accepted]
        raise UserError(f"objective.loss={config.objective.loss} is a {kind} loss; {config.objective.name} takes "
                        f"{' or '.join(accepted)} losses: {', '.join(names)}")
    if not own and "logits" in inspect.signature(losses.spec(config.objective.loss).fn).parameters:
        raise UserError(f"objective.loss={config.objective.loss} is a function of a model's logits (add it in your "
                        f"own loop: diffalign.losses.get({config.objective.loss!r})(logits, mask)); {config.objective.name} "
                        "trains losses of sequence or denoising scores")
    _check_loss_options(config.objective, None if own else losses.spec(config.objective.loss))
    # the method's own options, checked and completed with its defaults (the run's config.yaml shows them all)
    config.objective.options = objective.options_of(config.objective)
    if not own:
        _check_loss_inputs(config, objective, losses.spec(config.objective.loss))
    if config.data.precompute and (config.data.cache_dir is None or objective.dataset == "online"):
        raise UserError("data.precompute=true needs data.cache_dir (where the encodings go) and an objective "
                        f"that reads a dataset; {config.objective.name} with cache_dir={config.data.cache_dir!r}")
    choose("data.on_error", config.data.on_error, ("skip", "raise"))
    choose("data.ties", config.data.ties, ("drop", "soft"))
    choose("data.cache_latent_dtype", config.data.cache_latent_dtype, ("fp32", "bf16"))
    choose("train.mixed_precision", config.train.mixed_precision, ("no", "fp16", "bf16"))
    choose("train.reference_dtype", config.train.reference_dtype, ("auto", "fp32", "bf16", "fp16"))
    choose("train.reduce_dtype", config.train.reduce_dtype, ("fp32", "bf16"))
    choose("train.report_to", config.train.report_to, ("tensorboard", "wandb", "none"))
    choose("model.attention", config.model.attention, ("sdpa", "xformers"))
    for key, value in (("train.batch_size", config.train.batch_size), ("train.max_steps", config.train.max_steps),
                       ("train.gradient_accumulation", config.train.gradient_accumulation),
                       ("data.resolution", config.data.resolution),
                       ("train.distributed_timeout_s", config.train.distributed_timeout_s),
                       ("train.context_parallel", config.train.context_parallel)):
        if value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")
    if objective.family != "lm":
        _check_resolution(config)
    _check_context_parallel(config, objective)
    if config.data.workers is not None and config.data.workers < 0:
        raise UserError(f"data.workers must be >= 0 (0 = read in the training loop), got {config.data.workers}")
    if config.train.lora_rank < 0:
        raise UserError(f"train.lora_rank must be >= 0 (0 = full fine-tune), got {config.train.lora_rank}")
    if not config.train.lora_targets or not all(isinstance(t, str) and t for t in config.train.lora_targets):
        raise UserError(f"train.lora_targets must list module names, got {config.train.lora_targets!r}")
    if not config.model.path:
        raise UserError("model.path is empty: set it to a local diffusers folder or .safetensors file, "
                        "or the Hub id of a model in the local Hugging Face cache")
    online = OBJECTIVES[config.objective.name].dataset == "online"
    if not online and not config.data.path:
        raise UserError("data.path is empty: set it to a parquet file/folder, a datasets folder, a .jsonl index "
                        "or (captioned images) a folder of images with .txt captions")
    if len(config.data.image_columns) != 2:
        raise UserError("data.image_columns must name exactly two columns (the pair's images)")
    sources = config.data.source_columns
    if not isinstance(sources, list) or not all(isinstance(c, str) and c for c in sources):
        raise UserError(f"data.source_columns lists the columns of each row's source images; got {sources!r}")
    if sources and config.data.random_flip:
        raise UserError("data.random_flip flips each image on its own, which would mirror an edit but not its "
                        "source (data.source_columns): turn one of them off")
    for key in ("score_columns", "ensemble_columns"):
        for pair in getattr(config.data, key):
            if not _column_pair(pair):
                raise UserError(f"data.{key} holds one [first, second] column pair per reward model; got {pair!r}")
    choose("data.ensemble", config.data.ensemble, ("none", "filter", "weight", "soften"))
    if config.data.ensemble != "none" and (objective.dataset != "pairs" or not config.data.ensemble_columns):
        raise UserError(f"data.ensemble={config.data.ensemble} judges each pair's label by reward models' scores: it "
                        f"needs a pairs objective and data.ensemble_columns; {config.objective.name} with ensemble_columns="
                        f"{config.data.ensemble_columns!r}")
    if config.data.score_scales and (len(config.data.score_scales) != len(config.data.score_columns)
                                   or min(config.data.score_scales) <= 0):
        raise UserError("data.score_scales needs one positive scale per data.score_columns pair, or none")
    choose("data.curriculum", config.data.curriculum, ("none", "score_gap"))
    if config.data.curriculum == "score_gap" and not (
            (objective.dataset == "pairs" and config.data.score_columns)
            or (objective.dataset == "text_pairs" and config.data.reward_columns)):
        raise UserError("data.curriculum=score_gap orders pairs by the gap between their reward scores: it needs "
                        "image pairs and data.score_columns, or text pairs and data.reward_columns; "
                        f"{config.objective.name} with score_columns={config.data.score_columns!r}, reward_columns="
                        f"{config.data.reward_columns!r}")
    if config.data.reward_columns and not _column_pair(config.data.reward_columns):
        raise UserError(f"data.reward_columns names one reward model's two score columns, [first, second]; got "
                        f"{config.data.reward_columns!r}")
    for key in ("weight_column", "margin_column", "reward_columns"):
        if getattr(config.data, key) and objective.dataset not in ("pairs", "text_pairs"):
            raise UserError(f"data.{key} gives each pair its own number; {config.objective.name} reads "
                            f"{objective.dataset}, not pairs")
    if config.data.step_pattern is not None:
        if objective.dataset != "text_ranked":
            raise UserError(f"data.step_pattern numbers the steps of ranked text completions (lm_rank); "
                            f"{config.objective.name} reads {objective.dataset}")
        try:
            re.compile(config.data.step_pattern)
        except re.error as error:
            raise UserError(f"data.step_pattern {config.data.step_pattern!r} is not a regular expression: {error}") from None
    spec = None if own else losses.spec(config.objective.loss)
    if config.data.margin_column is not None and (spec is None or "margin" not in spec.options):
        margins = [s.name for s in losses.specs() if "margin" in s.options]
        raise UserError(f"data.margin_column sets each pair's margin, which objective.loss={config.objective.loss} "
                        f"does not take; use a loss with a margin: {', '.join(margins)}")
    if config.data.reward_columns and (spec is None or "reward_gap" not in spec.inputs) \
            and config.data.curriculum != "score_gap":  # the curriculum orders the pairs by it
        readers = [s.name for s in losses.specs() if "reward_gap" in s.inputs]
        raise UserError(f"data.reward_columns gives each pair its reward gap, which objective.loss={config.objective.loss} "
                        f"does not read; use a loss that weighs pairs by it: {', '.join(readers)}")
    if config.data.ensemble == "soften" and kind != "soft-label":
        raise UserError("data.ensemble=soften trains on each pair's ensemble preference for its label, which needs "
                        "a soft-label loss (objective.loss=soft_dpo, smpo or bt_wide_ties)")
    if config.data.ties == "soft" and kind != "soft-label":
        raise UserError("data.ties=soft keeps ties as preference 0.5, which needs a soft-label loss "
                        "(objective.loss=bt_wide_ties, soft_dpo or smpo); use data.ties=drop otherwise")
    if config.data.positive_ratio is not None:
        if objective.dataset != "labelled_images":
            raise UserError(f"data.positive_ratio sets the share of liked images among labelled ones "
                            f"(diffusion_kto); {config.objective.name} reads {objective.dataset}")
        if not 0.0 < config.data.positive_ratio < 1.0:
            raise UserError(f"data.positive_ratio must be in (0, 1), got {config.data.positive_ratio}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise UserError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    if config.train.ema_every < 1:
        raise UserError(f"train.ema_every must be >= 1, got {config.train.ema_every}")
    if config.train.ema_every != 1 and config.train.ema_decay == 0:
        raise UserError(f"train.ema_every={config.train.ema_every} spaces the EMA's updates, but there is no EMA: "
                        "set train.ema_decay (e.g. 0.9) or leave ema_every at 1")
    if config.train.ema_decay and config.train.ema_every > config.train.max_steps:
        raise UserError(f"train.ema_every={config.train.ema_every} updates the EMA every {config.train.ema_every} "
                        f"optimiser steps, but the run takes {config.train.max_steps}: the EMA would never move and the "
                        "final weights (the EMA's) would be the base's; lower train.ema_every or train more steps")
    for key, beta in (("train.adam_beta1", config.train.adam_beta1), ("train.adam_beta2", config.train.adam_beta2)):
        if not 0.0 <= beta < 1.0:
            raise UserError(f"{key} must be in [0, 1), got {beta}")
    if config.train.adam_epsilon <= 0:
        raise UserError(f"train.adam_epsilon must be > 0, got {config.train.adam_epsilon}")
    from diffalign.rewards import RewardSpec

    for spec in config.validation.rewards:
        RewardSpec.parse(spec)
    _validate_gold(config, objective)
    _validate_drift(config)
    if objective.family == "lm":
        _validate_language_model(config, objective)
    elif config.data.packing:
        raise UserError(f"data.packing packs a language model's token sequences; {config.objective.name} trains "
                        "a diffusion model: remove it")
    _validate_other_models(config, objective)
    objective.check_config(config)  # the method's own rules, last: the shared ones above hold by now
    return config


def _check_resolution(config: Config) -> None:
    """``data.resolution`` and ``data.width`` must give whole latent tokens: multiples of the VAE's factor times the
    denoiser's patch (SD1.5/SDXL 8, SD3 and FLUX.1 16), read from the model folder's configs when it is local."""
    from diffalign.diffusion.backbones import pixel_multiple
    from diffalign.paths import find_locally

    folder = find_locally(config.model.config or config.model.path)
    multiple = None if folder is None or not folder.is_dir() else pixel_multiple(folder)
    for key, value in (("data.resolution", config.data.resolution), ("data.width", config.data.width)):
        if multiple and value is not None and value % multiple:
            below = value // multiple * multiple
            raise UserError(f"{key}={value} must be a multiple of {multiple} for {folder.name} (its VAE's factor "
                            f"times its denoiser's patch); try {below or multiple} or {below + multiple}")

def _language_model_defaults(config: Config) -> None:
    """The keys a language-model config leaves unset take the LM's defaults (``LM_DEFAULTS``) instead of the
    diffusion ones; the resolved config in the run's folder shows them."""
    given = getattr(config, "given_keys", frozenset())
    for dotted, value in LM_DEFAULTS.items():
        section, key = dotted.split(".")
        part = getattr(config, section)
        default = next(f for f in dataclasses.fields(part) if f.name == key)
        default = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
        if dotted not in given and getattr(part, key) == default:
            setattr(part, key, copy.deepcopy(value))

def _validate_language_model(config: Config, objective) -> None:
    """What a language-model run cannot do, said before any model loads."""
    dc = config.data
    if dc.estimator is not None:
        if objective.dataset != "text_pairs":
            raise UserError(f"data.estimator picks reliable text pairs; {config.objective.name} reads {objective.dataset}")
        if not 0.0 < dc.estimator_keep <= 0.5 or dc.estimator_passes < 1:
            raise UserError(f"data.estimator_keep must be in (0, 0.5] (UPO's bald_rate) and data.estimator_passes "
                            f">= 1; got {dc.estimator_keep} and {dc.estimator_passes}")
    if dc.packing and not objective.reads_packed:
        raise UserError(f"data.packing: {config.objective.name} reads every token's distribution from the padded "
                        "rows, not packed ones; remove it")
    image_only = [(key, bad) for key, bad in (
        ("data.cache_dir", dc.cache_dir is not None), ("data.precompute", dc.precompute),
        ("data.random_flip", dc.random_flip), ("data.score_columns", bool(dc.score_columns)),
        ("data.positive_ratio", dc.positive_ratio is not None),
        ("data.ties", dc.ties != "drop"), ("model.denoiser_file", config.model.denoiser_file is not None),
        ("model.config", config.model.config is not None)) if bad]
    if image_only:
        raise UserError(f"{', '.join(k for k, _ in image_only)}: set for {config.objective.name}, a language-model "
                        "objective, which has no use for it (it belongs to the image datasets and pipelines); "
                        "remove it")
    if config.validation.every > 0:
        raise UserError(f"validation.every={config.validation.every}: a language-model run samples no validation "
                        "during training; compare the final model with the base after it: `diffalign eval --base MODEL "
                        "--aligned RUN --prompts PROMPTS --out OUT` (a causal-LM --base compares language models)")
    if dc.max_length < 2:
        raise UserError(f"data.max_length must be >= 2 (a prompt token and a completion token), got {dc.max_length}")


def _validate_other_models(config: Config, objective) -> None:
    """``model.teacher`` and ``model.reference``: only for an objective that reads them."""
    if config.model.teacher is not None and not objective.reads_teacher:
        raise UserError(f"model.teacher={config.model.teacher}: {config.objective.name} has no teacher; lm_distill and "
                        "diffusion_distill distil a student from one")
    if config.model.reference is not None and not objective.frozen_reference:
        raise UserError(f"model.reference={config.model.reference}: {config.objective.name} has no fixed reference "
                        "to replace (it compares with pi_t, the policy as each round began, or with nothing); remove it")


def _check_loss_inputs(config: Config, objective, spec: LossSpec) -> None:
    """A self-play objective takes the losses that read what it estimates (``loss_names``); a loss with per-pair
    inputs (SPPO's win-rates) needs an objective that supplies them."""
    from diffalign.objectives import OBJECTIVES

    named = objective.loss_names
    if named is not None and spec.name not in named:
        raise UserError(f"objective.loss={spec.name}: {config.objective.name} trains {' or '.join(named)}")
    from_data = ("reward_gap",) if config.data.reward_columns else ()
    missing = [name for name in spec.inputs if name not in (*objective.supplies, *from_data)]
    if missing:
        suppliers = [n for n, cls in OBJECTIVES.items()
                     if set(spec.inputs) <= set(cls.supplies) and cls.family == objective.family]
        fix = (f"use objective.name={' or '.join(suppliers)}" if suppliers else
               "a pair's reward gap comes from data.reward_columns (one reward model's scores of the pair), its "
               "own weight or margin from data.weight_column or data.margin_column")
        raise UserError(f"objective.loss={spec.name} reads per-pair {', '.join(missing)}, which "
                        f"{config.objective.name} does not estimate; {fix}")

def _validate_drift(config: Config) -> None:
    """validation.drift_limits: known statistics with positive limits, measured at validations that run."""
    from diffalign.eval.image_stats import STATISTICS

    vc = config.validation
    for name, limit in vc.drift_limits.items():
        if name not in STATISTICS:
            raise UserError(f"validation.drift_limits names {name!r}; the statistics are {', '.join(STATISTICS)}")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit > 0:
            raise UserError(f"validation.drift_limits.{name} must be a number > 0 (the largest change from the "
                            f"base's value allowed), got {limit!r}")
    if vc.drift_limits and (vc.every < 1 or not (vc.prompts or vc.prompt_file)):
        raise UserError("validation.drift_limits watches the validation samples: set validation.every >= 1 and "
                        "validation.prompts or validation.prompt_file")
    if "diversity" in vc.drift_limits and vc.images_per_prompt < 2:
        raise UserError("validation.drift_limits.diversity compares images of the same prompt: set "
                        "validation.images_per_prompt >= 2")


def _validate_gold(config: Config, objective) -> None:
    from diffalign.rewards import RewardSpec

    vc = config.validation
    if vc.gold is None:
        return
    names = [RewardSpec.parse(spec).name for spec in vc.rewards]
    if vc.gold not in names or vc.every < 1 or objective.dataset != "online":
        raise UserError(f"validation.gold={vc.gold} watches a validation reward while an online objective "
                        f"trains: it must be one of validation.rewards ({', '.join(names) or 'none'}), with "
                        f"validation.every > 0 and an online objective (not {config.objective.name})")
    if vc.gold in reward_names(config.online.reward):
        raise UserError(f"validation.gold={vc.gold} is the reward the run trains on (online.reward); the gold "
                        "reward must be one the run does not see")
    if vc.gold_patience < 1:
        raise UserError(f"validation.gold_patience must be >= 1, got {vc.gold_patience}")


def _column_pair(value: Any) -> bool:
    """A [first, second] pair of column names, as each reward model's scores of a pair are given."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(c, str) for c in value)


def _check_loss_options(objective: ObjectiveConfig, spec: LossSpec | None) -> None:
    """Each ``objective.loss_options`` key must be an option of the chosen loss (``spec``; None for an
    objective's own loss, which takes none), of its default's type, and one of its values for an option with a
    fixed set (a method's own settings are ``objective.options``).

    Checked with the config, so a misspelt option stops the run before any model loads, not
    at its first step.
    """
    options = {} if spec is None else spec.options
    choices = {} if spec is None else spec.option_choices
    for key, value in objective.loss_options.items():
        dotted = f"objective.loss_options.{key}"
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            valid = ", ".join(f"{k} (default {v})" for k, v in options.items()) or "none"
            raise UserError(f"{dotted}: loss {objective.loss!r} has no option {key!r}{hint}. Its options: {valid}")
        default = options[key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if numeric else \
            isinstance(value, type(default))
        if not ok:
            raise UserError(f"{dotted}={value!r} should be a {type(default).__name__} like its default {default!r}")
        if key in choices and value not in choices[key]:
            raise UserError(f"{dotted}={value!r} is not valid; choose one of {', '.join(map(str, choices[key]))}")


# what a language-model config's unset keys mean instead of the diffusion defaults: TRL's beta, peft's every
# linear layer for LoRA, and TRL's unpaired `label` column
LM_DEFAULTS = {"objective.beta": 0.1, "train.lora_targets": ["all-linear"], "data.label_column": "label"}


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, schema: type | None = None) -> Any:
    """Read a YAML config, apply overrides, build and validate the typed config (``schema``, default :class:`Config`,
    which :func:`validate` checks; another schema checks itself with its ``validate`` method)."""
    config = read_config(path, overrides, schema=schema)
    return validate(config) if isinstance(config, Config) else config.validate()


def _check_context_parallel(config: Config, objective) -> None:
    """``train.context_parallel`` > 1 splits one diffusion transformer's forward over a group of processes, which
    every process of the group must run in step on the same examples: what does not, is refused here."""
    degree = config.train.context_parallel
    if degree == 1:
        return
    why = None
    if objective.family == "lm":
        why = "it splits a diffusion transformer's image or video tokens; a language model's sequences are not split"
    elif objective.samples_in_loss:
        why = (f"{config.objective.name} samples inside its loss, each process apart, and a split transformer needs "
               "every process of its group to sample the same images in step")
    elif config.model.compile:
        why = "model.compile traces the transformer before diffusers adds the split and gather around its blocks"
    if why:
        raise UserError(f"train.context_parallel={degree}: {why}. Use train.context_parallel=1 (data parallelism "
                        "and FSDP2 run it)")
