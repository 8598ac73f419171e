"""Causal language models and their tokenizers from local folders, and the runs diffalign trained.

A model folder is what ``save_pretrained`` writes (config.json, weights, tokenizer files); a Hub id
resolves to its snapshot in the local Hugging Face cache, nothing is downloaded. ``random_init``
builds the architecture from config.json with seeded random weights (tests and benchmarks). A
finished run's ``final`` folder holds either the whole model or a peft LoRA adapter over the base
named in its adapter_config.json; :func:`load_trained_lm` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from diffalign.errors import UserError
from diffalign.paths import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"


def is_causal_lm_folder(path: str | Path) -> bool:
    """Whether ``path`` is a transformers model folder (config.json, no diffusers model_index.json)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "model_index.json").exists()


def causal_lm_folder(source: str | Path) -> Path:
    """The local folder of the causal LM ``source`` names; a clear error when it is something else."""
    folder = resolve_model_path(source)
    if not is_causal_lm_folder(folder):
        raise UserError(f"model.path {source} is not a transformers model folder (no config.json, or it is a "
                        "diffusers pipeline): a language-model objective needs a causal LM saved with save_pretrained")
    return folder


def load_tokenizer(path: str | Path):
    """The folder's tokenizer, with a pad token (its EOS when it has none, as TRL sets it)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} holds no tokenizer that transformers can load ({str(err)[:200]}); a causal LM "
                        "folder needs its tokenizer files beside config.json") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_sequence_classifier(path: str | Path, role: str):
    """A local transformers sequence classifier (saved with save_pretrained) and its tokenizer, the tokenizer's pad
    token set on the model; ``role`` names what it is for in the error when the folder is missing."""
    from transformers import AutoModelForSequenceClassification

    if not Path(path).is_dir():
        raise UserError(f"{role} {path}: no such folder (a transformers sequence classifier saved with save_pretrained)")
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = load_tokenizer(path)  # its EOS as the pad token when it has none
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def without_dropout(model: nn.Module) -> nn.Module:
    """Dropout off, as TRL's trainers do by default (``disable_dropout``): the policy and reference
    log-probs of one sequence then agree at step 0, and a resumed or multi-process run is exact."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def load_causal_lm(source: str | Path, *, random_init: bool = False, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a local causal-LM folder or cached Hub id, dropout off; see the module docstring. Its
    tokenizer is :func:`load_tokenizer`'s."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = causal_lm_folder(source)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(str(folder))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"model.path {source} cannot be loaded as a causal LM ({type(err).__name__}: "
                        f"{str(err)[:300]})") from None
    return without_dropout(model)


def final_folder(run_or_folder: str | Path) -> Path:
    """A run's ``final`` folder, or the folder itself when it holds a model or an adapter."""
    path = Path(run_or_folder)
    return path / "final" if (path / "final").is_dir() else path


def load_trained_lm(run_or_folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a finished run (its ``final`` folder) or any causal-LM folder; a LoRA adapter is
    merged into its base, so the model runs at the base's speed."""
    folder = final_folder(run_or_folder)
    adapter = folder / ADAPTER_CONFIG
    if not adapter.is_file():
        return load_causal_lm(folder, dtype=dtype), load_tokenizer(folder)
    from peft import PeftModel

    base_path = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base_path or not Path(base_path).exists():
        raise UserError(f"{folder} holds a LoRA adapter whose base model ({base_path!r}, from {ADAPTER_CONFIG}) is "
                        "not on this machine; put the base there or edit base_model_name_or_path")
    model = PeftModel.from_pretrained(load_causal_lm(base_path, dtype=dtype), str(folder)).merge_and_unload()
    return model, load_tokenizer(folder)
