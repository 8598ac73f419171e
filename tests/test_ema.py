"""The trained weights' EMA (diffalign/train/ema.py): updated every train.ema_every optimiser steps at the decay of
the step it is at, min(ema_decay, (1 + s) / (10 + s)), which with decay 0.9 every 8 steps is Flow-GRPO's EMA
(flow_grpo/ema.py), computed here by hand; every step is diffusers' EMAModel as it was."""

from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel

from diffalign.errors import UserError
from diffalign.paths import CONFIGS
from diffalign.train import load_config
from diffalign.train.ema import ema_step


def _run(every: int, steps: int = 20) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """(the steps that updated, the EMA's final value, the weights after each step) of weights that step to
    sin(s) after optimiser step s."""
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([weight], decay=0.9)
    updated, seen = [], []
    for s in range(steps):
        weight.data = torch.full((3,), float(torch.sin(torch.tensor(s + 1.0))))
        seen.append(weight.detach().clone())
        if ema_step(ema, [weight], s, every):
            updated.append(s)
    return updated, ema.shadow_params[0], seen


def test_every_eight_steps_at_decay_point_nine_is_flow_grpo_s_ema_by_hand():
    updated, value, seen = _run(every=8)
    assert updated == [7, 15]
    expected = torch.zeros(3)  # the EMA starts as the initial weights
    for s in (7, 15):  # EMAModuleWrapper.step: decay min((1 + s) / (10 + s), 0.9) when (s + 1) % 8 == 0
        decay = min((1 + s) / (10 + s), 0.9)
        expected = expected + (1 - decay) * (seen[s] - expected)
    torch.testing.assert_close(value, expected)


def test_every_step_is_diffusers_ema_model_as_it_was():
    weight = torch.nn.Parameter(torch.zeros(3))
    plain = EMAModel([weight], decay=0.9)
    for s in range(20):
        weight.data = torch.full((3,), float(torch.sin(torch.tensor(s + 1.0))))
        plain.step([weight])
    updated, value, _ = _run(every=1)
    assert updated == list(range(20))
    torch.testing.assert_close(value, plain.shadow_params[0])


def test_spacing_updates_of_no_ema_or_by_zero_steps_is_refused():
    with pytest.raises(UserError, match="there is no EMA: set train.ema_decay"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["train.ema_every=8"])
    with pytest.raises(UserError, match="train.ema_every must be >= 1"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["train.ema_every=0", "train.ema_decay=0.9"])
    assert load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["train.ema_every=8", "train.ema_decay=0.9"]).train.ema_every == 8


def test_an_ema_spaced_beyond_the_runs_length_is_refused_as_it_would_never_move():
    with pytest.raises(UserError, match="the EMA would never move"):
        load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["train.ema_every=8", "train.ema_decay=0.9",
                                                         "train.max_steps=4"])
    assert load_config(CONFIGS / "toy_diffusion_dpo.yaml", ["train.ema_every=4", "train.ema_decay=0.9",
                                                            "train.max_steps=4"]).train.max_steps == 4
