"""Reading reward-model checkpoints a user points to, with errors that say what is wrong.

Reward checkpoints are published as safetensors or as PyTorch pickles (HPS v2's ``.pt``, the
LAION aesthetic predictor's ``.pth``). Pickles are read with ``torch.load(weights_only=True)``,
which loads tensors only and never runs code from the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from diffalign.errors import UserError

Tensor = torch.Tensor


def read_state_dict(path: str | Path, *, what: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from a ``state_dict`` entry and DDP ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: checkpoint file {path} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UserError(f"{what}: cannot read {path} as a safetensors or PyTorch weights file ({err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{what}: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: nn.Module, state: dict[str, Tensor], *, path: str | Path, what: str, expected: str) -> None:
    """Load ``state`` into ``module``, every key and shape matching, or say which file and what was expected."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                details.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                           f"model {tuple(own[k].shape)})")
        raise UserError(f"{what}: {path} does not match {expected}: {'; '.join(details)}")
    module.load_state_dict(state)
