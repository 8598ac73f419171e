"""Stochastic samplers with per-step log-probabilities: the recorded log-prob of a step equals
the one recomputed under the same model, the Gaussian is the published step (DDIM eta > 0 via
diffusers; Flow-GRPO's SDE written out by hand), and another model scores the steps differently."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import gaussian_log_prob, sample_trajectories, step_log_prob

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("model", ["toy", "tiny-sd3"])
def test_recomputed_log_prob_of_every_recorded_step_equals_the_recorded_one(model):
    path = ROOT / "assets/models/toy-base" if model == "toy" else ROOT / "assets/models/tiny-sd3"
    backbone = backbone_for(load_pipeline(path, random_init=model != "toy"))
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    uncond = backbone.encode_prompts(["", ""])
    noise = torch.randn(2, *((4, 16, 16) if model == "toy" else (4, 8, 8)), generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(backbone, noise, cond, steps=6, eta=0.7, guidance_scale=3.0, uncond=uncond,
                               generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape[:2] == (2, 7) and traj.log_probs.shape == (2, 6)
    assert torch.isfinite(traj.log_probs).all()
    for k in range(6):
        again = step_log_prob(backbone, traj.latents, k, cond, eta=0.7, guidance_scale=3.0, uncond=uncond)
        torch.testing.assert_close(again, traj.log_probs[:, k], rtol=1e-4, atol=1e-4)
    calls = []
    hook = backbone.denoiser.register_forward_pre_hook(  # the UNet takes its latents by position, SD3 by name
        lambda module, args, kwargs: calls.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    mixed = step_log_prob(backbone, traj.latents, torch.tensor([4, 1]), cond, eta=0.7, guidance_scale=3.0, uncond=uncond)
    hook.remove()
    torch.testing.assert_close(mixed, torch.stack([traj.log_probs[0, 4], traj.log_probs[1, 1]]), rtol=1e-4, atol=1e-4)
    assert calls == [4]  # one guided forward (2 trajectories x unconditional and conditional), not one per step

    other = load_pipeline(path, random_init=True, seed=5).components["unet" if model == "toy" else "transformer"]
    elsewhere = step_log_prob(backbone, traj.latents, 2, cond, eta=0.7, guidance_scale=3.0, uncond=uncond, denoiser=other)
    assert (elsewhere - traj.log_probs[:, 2]).abs().max() > 1e-3  # well above the 1e-4 recompute tolerance


def test_ddim_step_is_the_eta_gaussian_of_song_et_al_by_hand():
    from diffalign.diffusion.logprob import StepRule

    backbone = backbone_for(load_pipeline(ROOT / "assets/models/toy-base"))
    rule = StepRule(backbone, 10, 0.5, (4, 8, 8))
    a = backbone.scheduler.alphas_cumprod
    k = 3
    t = int(rule.timesteps[k])
    prev = t - 100
    x, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    mean, std = rule.distribution(k, x, eps)
    sigma = 0.5 * math.sqrt((1 - a[prev]) / (1 - a[t]) * (1 - a[t] / a[prev]))
    x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
    expected = a[prev].sqrt() * x0 + math.sqrt(1 - a[prev] - sigma ** 2) * eps  # Eq. 12
    assert std.item() == pytest.approx(sigma, rel=1e-5)
    torch.testing.assert_close(mean, expected, rtol=1e-4, atol=1e-5)
    sample = mean + 0.3 * std
    by_hand = (-(0.3 ** 2) / 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), torch.full((2,), by_hand), rtol=1e-5, atol=1e-5)


def test_flow_step_is_flow_grpo_sde_by_hand():
    from diffalign.diffusion.logprob import StepRule

    backbone = backbone_for(load_pipeline(ROOT / "assets/models/tiny-sd3", random_init=True))
    rule = StepRule(backbone, 8, 0.7, (4, 8, 8))
    k = 2
    sigma, nxt = rule.sigmas[k].item(), rule.sigmas[k + 1].item()
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mean, std = rule.distribution(k, x, v)
    std_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    dt = nxt - sigma
    torch.testing.assert_close(mean, x + (v + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt)
    assert std.item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-6)
    assert rule.sigmas[-1] == 0 and rule.sigmas[0] == 1


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-wan"])
def test_the_first_flow_step_takes_the_second_sigma_where_the_grid_starts_at_or_just_below_1(model):
    """Flow-GRPO's SDE divides by 1 - sigma and uses the grid's second sigma at sigma = 1 (SD3's grid starts there);
    Wan's UniPC grid starts at 1 - 1e-6, where the same rule read literally gives a std of eta x 1000 and the first
    step throws the latents out by 1e4. Both grids take the second sigma at their first step."""
    from diffalign.diffusion.logprob import StepRule

    pipe = load_pipeline(ROOT / "assets/models" / model, random_init=True)
    backbone = backbone_for(pipe, frames=5) if model == "tiny-wan" else backbone_for(pipe)
    shape = backbone.latent_shape(32)
    rule = StepRule(backbone, 8, 0.7, shape)
    sigma, second = rule.sigmas[0].item(), rule.sigmas[1].item()
    assert 1 - 1e-5 < sigma <= 1 and (model == "tiny-wan") == (sigma < 1)
    x, v = torch.randn(1, *shape), torch.randn(1, *shape)
    mean, std = rule.distribution(0, x, v)
    std_t = 0.7 * math.sqrt(sigma / (1 - second))
    assert std.item() == pytest.approx(std_t * math.sqrt(sigma - second), rel=1e-6) and std.item() < 1
    torch.testing.assert_close(mean, x + (v + std_t ** 2 / (2 * sigma) * (x + (1 - sigma) * v)) * (second - sigma))


def test_d3po_step_loss_is_dpo_on_clipped_log_ratios_by_hand():
    from diffalign.objectives.d3po import d3po_step_loss

    policy_w, policy_l = torch.tensor([-1.00, -2.0]), torch.tensor([-1.30, -2.5])
    ref_w, ref_l = torch.tensor([-1.05, -2.5]), torch.tensor([-1.20, -2.0])
    loss = d3po_step_loss(policy_w, policy_l, ref_w, ref_l, beta=0.1, eps=0.1)
    expected = []
    for pw, pl, rw, rl in zip(policy_w.tolist(), policy_l.tolist(), ref_w.tolist(), ref_l.tolist(), strict=True):
        clip = lambda r: min(max(r, math.log(0.9)), math.log(1.1))  # noqa: E731
        expected.append(math.log1p(math.exp(-0.1 * (clip(pw - rw) - clip(pl - rl)))))
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # second pair: both ratios beyond the clip, so the loss does not move the policy
    policy_w.requires_grad_(True)
    d3po_step_loss(policy_w, policy_l, ref_w, ref_l).sum().backward()
    assert policy_w.grad[0] < 0 and policy_w.grad[1] == 0  # raising the winner's log-prob lowers the loss
