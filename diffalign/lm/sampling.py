"""Sampling completions from a causal LM with transformers' ``generate``, seeded batch by batch."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], *, seed: int, max_new_tokens: int = 32,
                       temperature: float = 1.0, batch_size: int = 64) -> list[str]:
    """One sampled completion per prompt (plain sampling at ``temperature``, no top-k/top-p), without the
    prompt and the EOS. Batch i is drawn after ``torch.manual_seed(seed + i)``: the same prompts, seed and
    batch size give the same completions. Prompts are left-padded, as batched decoding needs."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            torch.manual_seed(seed + i)
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            completions += [" " + text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return completions
