"""The toy text world's training data: the shipped LM's own completions, scored by the toy preference.

:func:`sample_text_candidates` draws K completions per group for the training prompts; the writers turn
them into the three text layouts (:mod:`diffalign.data.text`), each written whole or not at all:
``pairs`` (each group's best vs worst; groups with no spread dropped), ``labelled`` (every completion,
desirable when it beats its group's mean), ``ranked`` (each whole group with its scores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from diffalign.lm.loading import load_trained_lm
from diffalign.lm.sampling import sample_completions
from diffalign.toy.candidates import write_table
from diffalign.toy.text_model import TOY_LM
from diffalign.toy.text_world import preference_score, prompts as toy_prompts

MAX_NEW_TOKENS = 12  # a sentence is 9 words and the EOS


def sample_text_candidates(groups_per_prompt: int, candidates: int, seed: int) -> list[tuple[str, list[str]]]:
    """(prompt, K completions) per group, ``groups_per_prompt`` groups per training prompt, from the shipped LM."""
    model, tokenizer = load_trained_lm(TOY_LM)
    prompts = [p for p in toy_prompts("train") for _ in range(groups_per_prompt * candidates)]
    completions = sample_completions(model, tokenizer, prompts, seed=seed, max_new_tokens=MAX_NEW_TOKENS,
                                     progress=f"sampling {len(prompts)} toy completions ({candidates} per group) "
                                              "to pair up")
    return [(prompts[i], completions[i:i + candidates]) for i in range(0, len(prompts), candidates)]


def write_text_pairs(groups: Sequence[tuple[str, list[str]]], out: Path) -> Path:
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "score_chosen": [], "score_rejected": []}
    for prompt, completions in groups:
        scores = [preference_score(c) for c in completions]
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            continue
        for key, value in (("prompt", prompt), ("chosen", completions[best]), ("rejected", completions[worst]),
                           ("score_chosen", scores[best]), ("score_rejected", scores[worst])):
            rows[key].append(value)
    return write_table(rows, out)


def write_text_labelled(groups: Sequence[tuple[str, list[str]]], out: Path) -> Path:
    rows: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    for prompt, completions in groups:
        scores = [preference_score(c) for c in completions]
        mean = sum(scores) / len(scores)
        for completion, score in zip(completions, scores):
            rows["prompt"].append(prompt)
            rows["completion"].append(completion)
            rows["label"].append(score > mean)
    return write_table(rows, out)


def write_text_ranked(groups: Sequence[tuple[str, list[str]]], out: Path) -> Path:
    rows: dict[str, list] = {"prompt": [p for p, _ in groups], "completions": [c for _, c in groups],
                             "scores": [[preference_score(x) for x in c] for _, c in groups]}
    return write_table(rows, out)
