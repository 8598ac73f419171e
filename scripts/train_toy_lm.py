"""Train the toy text world's base LM and write it to assets/models/toy-lm (safetensors, tokenizer).

A two-layer GPT-2 with a word-level tokenizer (:mod:`diffalign.toy.text_model`) learns the base
corpus of :mod:`diffalign.toy.text_world` (every prompt, held-out ones included: the base model knows
the whole language; the demo only keeps the held-out prompts out of its preference pairs) by
next-token prediction on prompt + completion + EOS, with seeded batches.

Re-run to reproduce the shipped weights (same torch version and CPU; about a minute on 2 cores):
``python scripts/train_toy_lm.py``
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from diffalign.toy.text_model import TOY_LM, toy_lm_config, toy_tokenizer
from diffalign.toy.text_world import ANIMALS, COLOURS, EOS, base_completion, prompt


def corpus_batch(rng: random.Random, tokenizer, size: int) -> dict[str, torch.Tensor]:
    """``size`` base-corpus sequences, right-padded; the labels ignore padding."""
    texts = []
    for _ in range(size):
        colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
        texts.append(prompt(colour, animal) + base_completion(rng, colour, animal) + EOS)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TOY_LM)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer, model = toy_tokenizer(), GPT2LMHeadModel(toy_lm_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(args.steps):
        loss = model(**corpus_batch(rng, tokenizer, args.batch_size)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
