"""Coefficients-preserving sampling (objective.sampler=cps): the step is flow_grpo's sde_type="cps" written out by hand,
it keeps the forward process's noise coefficient where the flow SDE does not, recorded log-probabilities are
recomputed exactly, its last step draws no noise and is never trained, and it refuses models it does not apply to."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule, sample_trajectories, step_log_prob, transition_log_prob
from diffalign.errors import UserError
from diffalign.train import load_config, train
from diffalign.train.online import sde_window

ROOT = Path(__file__).resolve().parent.parent
TINY_SD3 = ROOT / "assets/models/tiny-sd3"


@pytest.fixture(scope="module")
def sd3():
    return backbone_for(load_pipeline(TINY_SD3, random_init=True))


def test_the_step_is_flow_grpo_s_cps_by_hand(sd3):
    rule = StepRule(sd3, 8, 0.7, (4, 8, 8), sampler="cps")
    k = 2
    sigma, nxt = rule.sigmas[k].item(), rule.sigmas[k + 1].item()
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mean, std = rule.distribution(k, x, v)
    std_t = nxt * math.sin(0.7 * math.pi / 2)  # sigma_t of the paper
    x0, x1 = x - sigma * v, x + v * (1 - sigma)  # the predicted sample and noise
    torch.testing.assert_close(mean, x0 * (1 - nxt) + x1 * math.sqrt(nxt ** 2 - std_t ** 2))
    assert std.item() == pytest.approx(std_t, rel=1e-6)
    sample = mean + 0.3 * std
    # the authors' log-probability drops the constants and the variance: -mean (sample - mean)^2
    torch.testing.assert_close(transition_log_prob(sample, mean, std, "cps"), -((0.3 * std) ** 2).reshape(1))
    last = rule.distribution(7, x, v)
    assert not rule.noisy(7) and rule.noisy(6) and last[1].item() == 0
    torch.testing.assert_close(last[0], x - rule.sigmas[7].item() * v)  # lands on the predicted x0


def test_a_perfect_model_s_cps_sample_keeps_the_forward_noise_coefficient_and_the_sde_s_does_not(sd3):
    """At x = (1 - s) x0 + s x1 with the exact velocity x1 - x0, a CPS step leaves x' = (1 - s') x0 + n with n of
    standard deviation s' per element, the forward process's at s'. The flow SDE's step leaves a different one."""
    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(1, 4, 128, 128, generator=g) for _ in range(3))
    spreads = {}
    for sampler in ("cps", "sde"):
        rule = StepRule(sd3, 8, 0.7, (4, 128, 128), sampler=sampler)
        k = 3
        sigma, nxt = rule.sigmas[k].item(), rule.sigmas[k + 1].item()
        mean, std = rule.distribution(k, (1 - sigma) * x0 + sigma * x1, x1 - x0)
        x_next = mean + std * z
        spreads[sampler] = ((x_next - (1 - nxt) * x0).std() / nxt).item()
    assert spreads["cps"] == pytest.approx(1.0, abs=0.01)
    assert abs(spreads["sde"] - 1.0) > 0.02


def test_recorded_log_probs_are_recomputed_exactly_and_the_last_step_records_none(sd3):
    cond = sd3.encode_prompts(["a red circle", "a blue square"])
    uncond = sd3.encode_prompts(["", ""])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(sd3, noise, cond, steps=6, eta=0.7, guidance_scale=3.0, uncond=uncond,
                               generator=torch.Generator().manual_seed(1), sampler="cps")
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(2))  # no noise at the last step: nothing to score
    assert (traj.log_probs[:, :-1] < 0).all()
    for k in range(5):
        again = step_log_prob(sd3, traj.latents, k, cond, eta=0.7, guidance_scale=3.0, uncond=uncond, sampler="cps")
        torch.testing.assert_close(again, traj.log_probs[:, k], rtol=1e-4, atol=1e-6)


def test_cps_is_refused_where_it_does_not_apply():
    toy = backbone_for(load_pipeline(ROOT / "assets/models/toy-base"))
    with pytest.raises(UserError, match="objective.sampler=cps is coefficients-preserving sampling for flow models"):
        StepRule(toy, 8, 0.7, (4, 8, 8), sampler="cps")
    with pytest.raises(UserError, match="objective.sampler='ddim': choose one of sde, cps"):
        load_config(ROOT / "configs/toy_grpo.yaml", ["objective.sampler=ddim"])


def test_flow_grpo_trains_on_cps_rounds_never_on_their_last_step(tmp_path):
    config = load_config(ROOT / "configs/toy_grpo.yaml", [
        f"model.path={TINY_SD3}", "model.random_init=true", "objective.sampler=cps", "objective.sample_steps=3",
        "objective.t_range=[0.0, 1.0]", "online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
        "online.reward=jpeg_incompressibility", "train.batch_size=4", "train.max_steps=2", "validation.every=0",
        f"output_dir={tmp_path / 'run'}"])
    assert sde_window(config, 0).tolist() == [True, True, False]
    summary = train(config)
    assert summary["steps"] == 2 and summary["bad_steps"] == 0
    metrics = [line for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics and all('"kl": ' in line and "Infinity" not in line and "NaN" not in line for line in metrics)
