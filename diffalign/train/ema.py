"""When and how the trained weights' EMA is updated: diffusers' ``EMAModel``, stepped every ``train.ema_every``
optimiser steps with the decay of the step it is at.

The decay after optimiser step s (0-based) is min(``train.ema_decay``, (1 + s) / (10 + s)): diffusers' warm-up,
counted in optimiser steps whether or not the EMA was updated at each, as Flow-GRPO's ``EMAModuleWrapper``
(``flow_grpo/ema.py``, ``get_current_decay``) counts them; so ``ema_decay: 0.9`` with ``ema_every: 8`` is Flow-GRPO's
EMA (``scripts/train_sd3.py``: decay 0.9, ``update_step_interval=8``). The one difference: at s = 0 diffusers uses
decay 0 (the EMA starts as a copy), Flow-GRPO 0.1; with updates every N > 1 steps none falls on s = 0.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers.training_utils import EMAModel


def ema_step(ema: EMAModel, params: Iterable[torch.nn.Parameter], step: int, every: int) -> bool:
    """Update ``ema`` after optimiser step ``step`` (0-based) if (step + 1) is a multiple of ``every``, at that
    step's decay (module docstring); whether it did."""
    if (step + 1) % every:
        return False
    ema.optimization_step = step  # EMAModel.step counts one more, then reads the decay of step `step`
    ema.step(params)
    return True
