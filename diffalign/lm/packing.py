"""Sequence packing: several short sequences of a batch share one row, so the model runs on no padding.

A batch of completions is padded to its longest sequence; when lengths vary, much of every forward is
spent on pad tokens (a chosen/rejected batch of one 400-token and many 60-token sequences pads most rows
six-fold). Packing lays the N sequences end to end into R <= N rows no longer than the longest one (first
fit, longest first) and runs the model once on the rows with

- ``position_ids`` restarting at 0 at each sequence, so each sees the positions it would alone;
- a block-diagonal causal mask, (R, 1, L, L) booleans, so no token attends across a sequence boundary
  (PyTorch SDPA and eager attention take it as given; a packed batch without it would leak attention
  from one sequence into the next, which position ids alone do not stop under SDPA).

The logits of a packed row are exactly those of each sequence run alone (checked to float32 rounding by
the tests), so every score and loss is unchanged; only the work is less. :func:`packed_token_logps` gives
the per-token log-probs back in the batch's own (N, T) layout, so everything downstream reads a packed
batch as the padded one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.lm.logprobs import token_logps

Tensor = torch.Tensor


def pack(batch: dict[str, Tensor], *, pad_token_id: int) -> dict[str, Tensor]:
    """The packed layout of a right-padded batch (``input_ids`` and ``attention_mask``, (N, T)).

    Returns:
        ``packed_input_ids`` and ``packed_position_ids`` (R, L); ``packed_attention_mask`` (R, 1, L, L), True
        where a query may attend to a key (same sequence, not later); ``packed_index`` (N, T), the flat
        position in the (R * L) packed tokens of each token of each sequence (0 on padding).
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    capacity = batch["input_ids"].shape[1]
    rows: list[list[int]] = []  # the sequences of each packed row, in order
    room: list[int] = []
    for n in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # longest first, first fit
        row = next((r for r, free in enumerate(room) if free >= lengths[n]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(n)
        room[row] -= lengths[n]
    width = max(capacity - free for free in room)
    ids = torch.full((len(rows), width), pad_token_id, dtype=batch["input_ids"].dtype)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    index = torch.zeros_like(batch["input_ids"], dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for n in members:
            length = lengths[n]
            ids[r, start:start + length] = batch["input_ids"][n, :length]
            positions[r, start:start + length] = torch.arange(length)
            segment[r, start:start + length] = n
            index[n, :length] = r * width + start + torch.arange(length)
            start += length
    same = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(2) >= 0)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # a padding query attends to itself alone, so no row of the mask is empty (SDPA would give NaN)
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)
    device = batch["input_ids"].device
    return {"packed_input_ids": ids.to(device), "packed_position_ids": positions.to(device),
            "packed_attention_mask": mask.unsqueeze(1).to(device), "packed_index": index.to(device)}


def packed_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's logits on the packed rows, (R, L, V)."""
    return model(input_ids=batch["packed_input_ids"], position_ids=batch["packed_position_ids"],
                 attention_mask=batch["packed_attention_mask"], use_cache=False).logits


def packed_token_logps(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """log p(x_t | x_<t) for t >= 1 of each sequence, (N, T-1), from the logits of the packed rows.

    A token at packed position q is predicted from position q - 1, which holds the same sequence's previous
    token whenever t >= 1; the values across a sequence boundary are computed but never read.
    """
    per_token = F.pad(token_logps(logits, batch["packed_input_ids"]), (1, 0))  # [r, c]: log p(token c | < c)
    return per_token.reshape(-1)[batch["packed_index"][:, 1:]]


def padding_share(batch: dict[str, Tensor]) -> float:
    """The share of pad tokens among those the model runs on: of the packed rows when the batch has them."""
    rows = batch.get("packed_input_ids", batch["input_ids"])
    return 1.0 - float(batch["attention_mask"].sum()) / rows.numel()
