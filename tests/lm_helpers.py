"""Tiny language models, preference batches and LM training configs shared by the language-model tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM
from diffalign.train import load_config

VOCAB, PROMPT, COMPLETION = 32, 4, 6


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def preference_batch(n_pairs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Chosen completions count upwards from the last prompt token; rejected are random.

    Completion lengths vary per pair (right padding with token 0, masked out).
    """
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (n_pairs, PROMPT), generator=g)
    steps = torch.arange(1, COMPLETION + 1)
    chosen = (prompts[:, -1:] + steps) % (VOCAB - 1) + 1
    rejected = torch.randint(1, VOCAB, (n_pairs, COMPLETION), generator=g)
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    lengths = torch.randint(3, COMPLETION + 1, (2 * n_pairs,), generator=g)
    position = torch.arange(PROMPT + COMPLETION)
    completion = (position >= PROMPT) & (position < PROMPT + lengths.unsqueeze(1))
    attention = (position < PROMPT + lengths.unsqueeze(1)).long()
    ids = ids * attention
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion.long()}


def text_pairs(path: Path, n: int = 8, seed: int = 0, **extra_columns) -> Path:
    """n pairs of the toy language: a joyful sentence chosen over an angry one, other words random."""
    rng = random.Random(seed)
    prompts = tw.prompts("train")
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        colour, animal = tw.parse_prompt(prompt)
        rows["prompt"].append(prompt)
        rows["chosen"].append(tw.sentence(colour, animal, "joyful", rng.choice(tw.VERBS), rng.choice(tw.ADVERBS)))
        rows["rejected"].append(tw.sentence(colour, animal, "angry", rng.choice(tw.VERBS), rng.choice(tw.ADVERBS)))
    rows.update(extra_columns)
    pq.write_table(pa.table(rows), path)
    return path


def lm_config(tmp_path: Path, data: Path, *overrides: str, name: str = "run", model: Path = TOY_LM):
    return load_config(None, [f"model.path={model}", "objective.name=lm_dpo", "objective.loss=dpo",
                              f"data.path={data}", "train.batch_size=4", "train.max_steps=4",
                              "train.learning_rate=1e-3", "train.checkpoint_every=0", "train.log_every=1",
                              "train.report_to=none", f"output_dir={tmp_path / name}", *overrides])


def logged(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def empty_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path
