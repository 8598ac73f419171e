"""GRPO-Guard: the normalised ratio against verl-omni's expression, the bias it removes, the 1 / |dt| step weight and
the whole loss by hand, the gradient's direction, and its rounds (the sampler's step means recorded with them)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import step_after_one_sgd_step

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule, gaussian_log_prob, sample_trajectories, step_distribution
from diffalign.errors import UserError
from diffalign.objectives import GRPOGuard
from diffalign.paths import ASSETS, CONFIGS, TOY_BASE
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig
from diffalign.train.online import Round


def _nudged(denoiser: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``denoiser`` with every parameter moved a little: a policy some updates after the sampler."""
    import copy
    moved = copy.deepcopy(denoiser)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return moved


@pytest.fixture(scope="module")
def sd3():
    return backbone_for(load_pipeline(ASSETS / "models/tiny-sd3", random_init=True))


def _round(backbone, n: int = 4, steps: int = 4, guidance: float = 1.0):
    cond = backbone.encode_prompts(["a red circle", "a blue square"] * (n // 2))
    noise = torch.randn(n, *backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(backbone, noise, cond, steps=steps, eta=1.0, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(1), record_means=True)
    return cond, traj


def test_the_ratio_is_verl_omni_s_and_the_loss_is_the_clipped_surrogate_over_dt_by_hand(sd3):
    """On the flow SDE the closed form mean(z d) is verl-omni's exp((log p - log p_old + mse / (2 s^2)) s); each
    unit's clipped surrogate is divided by its step's sigma_k - sigma_{k+1}; the sampler's own steps give ratio 1."""
    objective = GRPOGuard(ObjectiveConfig(name="grpo_guard", loss="ppo_clip", sample_steps=4, sample_eta=1.0,
                                          sample_guidance_scale=1.0, options={"kl_coef": 0.0, "ratio_clip": 1e-3}),
                          sd3)
    cond, traj = _round(sd3)
    assert traj.means.shape == (4, 4, *traj.latents.shape[2:])
    step, rows = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    advantage = torch.tensor([1.0, -2.0, 7.0, -0.5])
    targets = {"advantage": advantage, "old_log_probs": traj.log_probs, "old_means": traj.means}
    _, own = objective(sd3, traj.latents[:, None], cond, {"step": step}, sd3.denoiser, None, **targets)
    ulps = 8 * torch.finfo(torch.float32).eps
    assert abs(own["ratio_min"].item() - 1) <= ulps and abs(own["ratio_max"].item() - 1) <= ulps

    policy = _nudged(sd3.denoiser, 2e-3, seed=5)
    loss, metrics = objective(sd3, traj.latents[:, None], cond, {"step": step}, policy, None, **targets)
    with torch.no_grad():
        mean, std = step_distribution(sd3, traj.latents, step, cond, eta=1.0, denoiser=policy)
    s = std.view(-1, 1, 1, 1)
    sample, old_mean = traj.latents[rows, step + 1], traj.means[rows, step]
    log_prob = gaussian_log_prob(sample, mean, s)
    mse = ((mean - old_mean) ** 2).flatten(1).mean(1)
    verl = torch.exp((log_prob - traj.log_probs[rows, step] + mse / (2 * std ** 2)) * std)
    assert not torch.allclose(verl, torch.ones(4), atol=1e-6)  # the nudge moved the means
    rule = StepRule(sd3, 4, 1.0, tuple(traj.latents.shape[2:]))
    dt = rule.sigmas[step] - rule.sigmas[step + 1]
    a = advantage.clamp(-5, 5)
    per_unit = torch.maximum(-a * verl, -a * verl.clamp(1 - 1e-3, 1 + 1e-3)) / dt
    assert loss.item() == pytest.approx(per_unit.mean().item(), rel=1e-4)
    assert metrics["ratio_max"].item() == pytest.approx(verl.max().item(), rel=1e-5)


def test_flow_grpo_s_log_ratio_is_the_guard_s_over_s_minus_a_bias_that_is_never_positive(sd3):
    """The paper's decomposition, exactly: log rho = log rho_guard / s - mean(d^2) / (2 s^2), so Flow-GRPO's ratios
    lean below 1 (most at small s) and RatioNorm's do not."""
    objective = GRPOGuard(ObjectiveConfig(name="grpo_guard", loss="ppo_clip", sample_steps=4, sample_eta=1.0,
                                          sample_guidance_scale=1.0), sd3)
    cond, traj = _round(sd3, n=8)
    policy = _nudged(sd3.denoiser, 2e-3, seed=7)
    biases = []
    for k in range(3):  # the last step's s is the smallest
        step, rows = torch.full((8,), k), torch.arange(8)
        with torch.no_grad():
            mean, std = step_distribution(sd3, traj.latents, step, cond, eta=1.0, denoiser=policy)
        sample = traj.latents[rows, step + 1]
        plain = gaussian_log_prob(sample, mean, std.view(-1, 1, 1, 1)) - traj.log_probs[:, k]
        guard, _ = objective.log_ratio(plain, torch.zeros(8), backbone=sd3, mean=mean, std=std.view(-1, 1, 1, 1),
                                       sample=sample, rows=rows, step=step, old_means=traj.means)
        bias = -((mean - traj.means[:, k]) ** 2).flatten(1).mean(1) / (2 * std ** 2)
        torch.testing.assert_close(plain, guard / std + bias, rtol=1e-4, atol=1e-6)
        assert (bias < 0).all()
        biases.append(bias.mean().item())
    assert biases[2] < biases[0]  # the bias grows as the step's noise shrinks


def test_the_level_drop_is_the_flow_s_dt_and_telescopes_on_ddim(sd3):
    flow = StepRule(sd3, 6, 1.0, (4, 4, 4))
    assert [flow.level_drop(k) for k in range(6)] == pytest.approx((flow.sigmas[:-1] - flow.sigmas[1:]).tolist())
    toy = backbone_for(load_pipeline(TOY_BASE))
    ddim = StepRule(toy, 6, 1.0, (4, 16, 16))
    drops = [ddim.level_drop(k) for k in range(6)]
    a, b = ddim.coefficients(0)
    assert all(d > 0 for d in drops) and sum(drops) == pytest.approx(b / (a + b))


def test_a_gradient_step_raises_the_guard_ratio_of_the_positive_sample_on_the_toy_model():
    objective, backbone, traj, step, mean, std = step_after_one_sgd_step(GRPOGuard, "grpo_guard")
    rows = torch.arange(2)
    guard, _ = objective.log_ratio(None, None, backbone=backbone, mean=mean, std=std.view(-1, 1, 1, 1),
                                   sample=traj.latents[rows, step + 1], rows=rows, step=step, old_means=traj.means)
    assert guard[0] > 0 > guard[1]  # the positive sample became likelier, the negative one less likely


def test_a_round_without_step_means_and_a_bad_option_are_refused(sd3):
    objective = GRPOGuard(ObjectiveConfig(name="grpo_guard", loss="ppo_clip", sample_steps=4), sd3)
    round_ = Round(prompts=["a"], latents=torch.zeros(1, 2, 5, 4, 4, 4), log_probs=torch.zeros(1, 2, 4),
                   rewards=torch.tensor([[0.0, 1.0]]), winners=lambda: torch.tensor([1]))
    with pytest.raises(UserError, match="sampled without its step means"):
        objective.training_units(round_)
    with pytest.raises(UserError, match="step_weight"):
        load_config(CONFIGS / "toy_grpo_guard.yaml", ["objective.options.step_weight=sigma"])


def test_the_toy_config_records_the_step_means_with_each_round(tmp_path):
    config = load_config(CONFIGS / "toy_grpo_guard.yaml", [
        f"output_dir={tmp_path / 'run'}", "online.groups_per_round=2", "online.group_size=2", "objective.sample_steps=2",
        "online.steps_per_round=1", "train.batch_size=2", "train.max_steps=1", "train.checkpoint_every=0",
        "train.log_every=1", "validation.every=0"])
    train(config)
    rounds = sorted((tmp_path / "run" / "rounds").glob("*/trajectories.safetensors"))
    saved = load_file(rounds[0])
    assert saved["means"].shape == (4, 2, *saved["latents"].shape[2:])
    # each recorded mean is the step the sampler took, less its noise: x_{k+1} - mean is the step's noise times s
    residual = (saved["latents"][:, 1:] - saved["means"]).flatten(2).std(dim=2)
    assert (residual > 0).all()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "clip_fraction" in logged and logged["train_s"] <= logged["elapsed_s"]
    # the sampler's own steps re-scored in another batch: in fp32 a ratio moves by rounding alone, far inside the clip
    assert 0 <= logged["round_ratio_error"] < 1e-5
