"""TempFlow-GRPO: the noise-aware weight and the whole loss by hand, the gradient's direction, and its branched
rounds (one noisy step a round, in turn over the trained steps; seed groups whose children share the path to it)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import step_after_one_sgd_step
from test_grpo_guard import _nudged

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import gaussian_log_prob, sample_trajectories, step_distribution
from diffalign.errors import UserError
from diffalign.objectives import TempFlowGRPO
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig


@pytest.fixture(scope="module")
def sd3():
    return backbone_for(load_pipeline(ASSETS / "models/tiny-sd3", random_init=True))


def test_each_unit_s_clipped_surrogate_is_weighted_by_2_25_times_its_step_s_noise_by_hand(sd3):
    """On the flow SDE: L = mean_u 2.25 s_u max(-A rho, -A clip(rho)) + beta KL, s_u = sigma_k sqrt(dt_k) the std
    of the unit's step (the authors' train_sd3_pr.py with sde_step_with_logprob's std_dev_t * sqrt(-dt)); the weight
    falls with the step's noise."""
    objective = TempFlowGRPO(ObjectiveConfig(name="tempflow_grpo", loss="ppo_clip", sample_steps=4, sample_eta=1.0,
                                             sample_guidance_scale=1.0, options={"kl_coef": 0.5, "ratio_clip": 1e-3}),
                             sd3)
    cond = sd3.encode_prompts(["a red circle", "a blue square"] * 2)
    noise = torch.randn(4, *sd3.latent_shape(32), generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(sd3, noise, cond, steps=4, eta=1.0, generator=torch.Generator().manual_seed(1))
    step, rows = torch.tensor([0, 1, 2, 0]), torch.arange(4)
    advantage = torch.tensor([1.0, -2.0, 7.0, -0.5])
    policy = _nudged(sd3.denoiser, 2e-3, seed=5)
    loss, metrics = objective(sd3, traj.latents[:, None], cond, {"step": step}, policy, sd3.denoiser,
                              advantage=advantage, old_log_probs=traj.log_probs)
    with torch.no_grad():
        mean, std = step_distribution(sd3, traj.latents, step, cond, eta=1.0, denoiser=policy)
        ref_mean, _ = step_distribution(sd3, traj.latents, step, cond, eta=1.0, denoiser=sd3.denoiser)
    s = std.view(-1, 1, 1, 1)
    rho = torch.exp(gaussian_log_prob(traj.latents[rows, step + 1], mean, s) - traj.log_probs[rows, step])
    a = advantage.clamp(-5, 5)
    surrogate = torch.maximum(-a * rho, -a * rho.clamp(1 - 1e-3, 1 + 1e-3))
    kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std ** 2)
    expected = (2.25 * std * surrogate).mean() + 0.5 * kl.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["policy_loss"].item() == pytest.approx((2.25 * std * surrogate).mean().item(), rel=1e-4)
    assert std[1] > std[2]  # past the first step (whose sigma 1 Flow-GRPO's SDE takes as the next one's), the later
    # the step, the less noise and the smaller the weight


def test_a_gradient_step_raises_the_log_probability_of_the_positive_advantage_child():
    _, _, traj, _, mean, std = step_after_one_sgd_step(TempFlowGRPO, "tempflow_grpo")
    ratio = (gaussian_log_prob(traj.latents[:, 2], mean, std.view(-1, 1, 1, 1)) - traj.log_probs[:, 1]).exp()
    assert ratio[0] > 1.0 > ratio[1]


def test_the_branching_step_moves_one_step_a_round_over_the_trained_steps_but_the_last(sd3):
    objective = TempFlowGRPO(ObjectiveConfig(name="tempflow_grpo", loss="ppo_clip", sample_steps=6), sd3)
    chosen = [int(objective.stochastic_steps(r, torch.tensor([2, 3, 4, 5]), 6).nonzero()) for r in range(5)]
    assert chosen == [2, 3, 4, 2, 3]  # step 5, the last, is never a branch
    assert int(objective.stochastic_steps(0, torch.tensor([5]), 6).nonzero()) == 5  # unless it is all there is
    assert objective.starting_noises(24) == 4


def test_a_round_branches_each_seed_s_children_at_one_step(tmp_path):
    """configs/toy_tempflow_grpo.yaml at 8 steps, whose noisier half is steps 0-3: round r (0, 1) draws noise at step r only
    (log-probabilities 0 elsewhere); a group of 8 is 2 starting noises of 4 children, which share every latent up to
    the branching step and differ after it; the run trains and logs the branching step's units."""
    config = load_config(CONFIGS / "toy_tempflow_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "online.groups_per_round=1", "objective.sample_steps=8",
        "online.steps_per_round=1", "train.batch_size=8", "train.max_steps=2", "train.checkpoint_every=0",
        "train.log_every=1", "validation.every=0"])
    train(config)
    rounds = sorted((tmp_path / "run" / "rounds").glob("*/trajectories.safetensors"))
    assert len(rounds) == 2
    for r, path in enumerate(rounds):
        saved = load_file(path)
        assert saved["stochastic"].nonzero().flatten().tolist() == [r]
        others = [k for k in range(8) if k != r]
        assert bool((saved["log_probs"][:, r] != 0).all()) and bool((saved["log_probs"][:, others] == 0).all())
        latents = saved["latents"].view(1, 2, 4, *saved["latents"].shape[1:])  # groups, seeds, children, ...
        for seed in latents.flatten(0, 1):
            assert torch.equal(seed[:, : r + 1], seed[:1, : r + 1].expand_as(seed[:, : r + 1]))
            assert (seed[0, r + 1] - seed[1, r + 1]).abs().max() > 1e-3
        assert (latents[:, 0, 0, 0] - latents[:, 1, 0, 0]).abs().max() > 1e-3  # two seeds, two starting noises
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all("clip_fraction" in entry for entry in logged)


def test_settings_the_branching_cannot_follow_are_refused(tmp_path):
    base = [f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(UserError, match="must be a multiple of it"):
        load_config(CONFIGS / "toy_tempflow_grpo.yaml", [*base, "online.group_size=6", "objective.options.parents=4"])
    with pytest.raises(UserError, match="remove online.sde_window"):
        load_config(CONFIGS / "toy_tempflow_grpo.yaml", [*base, "online.sde_window=2"])
    with pytest.raises(UserError, match="remove online.shared_noise"):
        load_config(CONFIGS / "toy_tempflow_grpo.yaml", [*base, "online.shared_noise=true"])
