"""Sampling completions from a causal LM with transformers' ``generate``, seeded batch by batch."""

from __future__ import annotations

from typing import Sequence

import logging

import torch
from tqdm.auto import tqdm

from diffalign.sharded import is_sharded


class _OwnPadding(logging.Filter):
    """Drops transformers' "We strongly recommend passing in an `attention_mask`" while we generate: we pass the
    mask, but ``generate`` drops an all-ones one (a batch with no padding) and then its model forward mistakes the
    pad tokens ``generate`` itself appends to finished sequences for padding, and says so once per process. The
    warning is false there, and a newcomer reads it as a bug of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], *, seed: int, max_new_tokens: int = 32,
                       temperature: float = 1.0, batch_size: int = 64, progress: str | None = None) -> list[str]:
    """One sampled completion per prompt (plain sampling at ``temperature``, no top-k/top-p), without the
    prompt and the EOS. Batch i is drawn after ``torch.manual_seed(seed + i)``: the same prompts, seed and
    batch size give the same completions. Prompts are left-padded, as batched decoding needs, and go to
    ``generate`` with their attention mask. ``progress``: a bar over the batches with that label."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    completions: list[str] = []
    warnings, own_padding = logging.getLogger("transformers.modeling_utils"), _OwnPadding()
    warnings.addFilter(own_padding)
    try:
        starts = range(0, len(prompts), batch_size)
        for i, start in enumerate(tqdm(starts, desc=progress, unit="batch", disable=progress is None)):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            torch.manual_seed(seed + i)
            out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=is_sharded(model))  # FSDP2: every process steps until all have ended
            new = out[:, batch["input_ids"].shape[1]:]
            completions += [" " + text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        warnings.removeFilter(own_padding)
    return completions
