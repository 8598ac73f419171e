"""Flow-GRPO on the round driver: the authors' per-prompt advantages, the clipped surrogate and the KL by hand,
the importance ratio of the sampler's own steps equal to 1, and the config's refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import gaussian_log_prob, sample_trajectories, step_distribution
from diffalign.errors import UserError
from diffalign.objectives import FlowGRPO
from diffalign.objectives.grpo import clipped_surrogate, group_advantages
from diffalign.paths import TOY_BASE
from diffalign.train import load_config
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


def _tracker_advantages(prompts: list[str], rewards: list[float], global_std: bool) -> np.ndarray:
    """flow_grpo's PerPromptStatTracker.update (type grpo), written out: mean of the prompt's rewards, std of all
    rewards or of the prompt's, population deviations plus 1e-4."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        same = rewards[prompts == prompt]
        std = (np.std(rewards) if global_std else np.std(same)) + 1e-4
        advantages[prompts == prompt] = (same - np.mean(same)) / std
    return advantages


@pytest.mark.parametrize("std", ["global", "group"])
def test_advantages_are_the_authors_per_prompt_statistics(std):
    rewards = torch.tensor([[0.1, 0.5, 0.9], [2.0, 2.0, 5.0], [0.3, 0.2, 0.0]])
    prompts = ["a cat", "a dog", "a cat"]  # the same prompt in two groups pools its statistics, as the tracker does
    flat = [p for p in prompts for _ in range(3)]
    ours = group_advantages(rewards.reshape(-1), flat, std=std)
    expected = _tracker_advantages(flat, rewards.reshape(-1).tolist(), global_std=std == "global")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_clipped_surrogate_by_hand():
    log_prob, old = torch.tensor([0.0, 0.2, -0.2, 0.05]), torch.zeros(4)
    advantage = torch.tensor([1.0, 1.0, -1.0, -2.0])
    ratio = log_prob.exp()
    # A > 0: the ratio counts up to 1 + eps; A < 0: down to 1 - eps, and any rise in full
    expected = [-1.0, -1.0 * min(ratio[1].item(), 1.1), 1.0 * max(ratio[2].item(), 0.9), 2.0 * ratio[3].item()]
    torch.testing.assert_close(clipped_surrogate(log_prob - old, advantage, 0.1), torch.tensor(expected))


@pytest.mark.parametrize("model", ["toy", "tiny-sd3"])
def test_the_sampler_s_own_steps_have_ratio_one_and_the_loss_is_the_formula_by_hand(model):
    """At the first inner step the policy is the sampler: recomputing its log-probabilities in fp32 on the same
    batch gives ratio 1 exactly (flow_grpo #211 asks about this ratio), so the loss is -mean(clip(A)) plus the
    KL; with a nudged reference the KL is ||mu - mu_ref||^2 / (2 sigma^2), element mean, by hand."""
    pipe = load_pipeline(TOY_BASE) if model == "toy" else load_pipeline(ROOT / "assets/models" / model, random_init=True)
    backbone = backbone_for(pipe)
    config = ObjectiveConfig(name="grpo", loss="ppo_clip", sample_steps=4, sample_eta=1.0, sample_guidance_scale=3.0, options={"kl_coef": 0.5})
    objective = FlowGRPO(config, backbone)
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a red circle"])
    uncond = backbone.encode_prompts([""] * 3)
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectories(backbone, noise, cond, steps=4, eta=1.0, guidance_scale=3.0, uncond=uncond,
                               generator=torch.Generator().manual_seed(1))
    advantage = torch.tensor([7.0, -0.5, 1.5])  # the first beyond the clip at 5
    step = torch.full((3,), 2)
    targets = {"advantage": advantage, "old_log_probs": traj.log_probs}
    loss, metrics = objective(backbone, traj.latents[:, None], cond, {"step": step}, backbone.denoiser,
                              backbone.denoiser, **targets)
    # 1 within 4 ulps of fp32, not bit for bit: the sampler scored all rows of each step in one guided batch (with
    # their unconditional halves), the objective re-scores one step's rows; a CPU's matmul kernels may block, and so
    # sum, another batch shape in another order (seen: 1 + 1 ulp on an AVX-512 Xeon, exactly 1 on AMD EPYC)
    ulps = 4 * torch.finfo(torch.float32).eps
    assert abs(metrics["ratio_min"].item() - 1.0) <= ulps and abs(metrics["ratio_max"].item() - 1.0) <= ulps
    assert metrics["clip_fraction"] == 0
    assert metrics["kl"].item() == 0.0
    assert loss.item() == pytest.approx(-torch.tensor([5.0, -0.5, 1.5]).mean().item(), rel=1e-6)

    reference = load_pipeline(TOY_BASE).unet if model == "toy" else \
        load_pipeline(ROOT / "assets/models" / model, random_init=True, seed=1).transformer
    if model == "toy":
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.01 * torch.randn_like(p))
    loss, metrics = objective(backbone, traj.latents[:, None], cond, {"step": step}, backbone.denoiser, reference,
                              **targets)
    with torch.no_grad():
        mean, std = step_distribution(backbone, traj.latents, step, cond, eta=1.0, guidance_scale=3.0, uncond=uncond)
        ref_mean, _ = step_distribution(backbone, traj.latents, step, cond, eta=1.0, guidance_scale=3.0, uncond=uncond,
                                        denoiser=reference)
    kl = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)
    assert metrics["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5) and kl.mean() > 0
    assert loss.item() == pytest.approx(-torch.tensor([5.0, -0.5, 1.5]).mean().item() + 0.5 * kl.mean().item(),
                                        rel=1e-5)


def step_after_one_sgd_step(objective_class, name: str):
    """Two toy trajectories of one prompt, advantages (+1, -1), one SGD step (lr 1e-4) on the objective's loss at
    recorded step 1 (KL off, clip 0.5); then (objective, backbone, trajectories, step, the step's mean and std under
    the moved policy)."""
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = objective_class(ObjectiveConfig(name=name, loss="ppo_clip", sample_steps=4, sample_guidance_scale=1.0,
                                                options={"kl_coef": 0.0, "ratio_clip": 0.5}), backbone)
    cond = backbone.encode_prompts(["a red circle"] * 2)
    traj = sample_trajectories(backbone, torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), cond,
                               steps=4, eta=1.0, generator=torch.Generator().manual_seed(4), record_means=True)
    targets = {"advantage": torch.tensor([1.0, -1.0]), "old_log_probs": traj.log_probs, "old_means": traj.means}
    step = torch.full((2,), 1)
    loss, _ = objective(backbone, traj.latents[:, None], cond, {"step": step}, backbone.denoiser, None, **targets)
    loss.backward()
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
        mean, std = step_distribution(backbone, traj.latents, step, cond, eta=1.0)
    return objective, backbone, traj, step, mean, std


def test_a_gradient_step_raises_the_log_probability_of_positive_advantage_samples():
    _, _, traj, _, mean, std = step_after_one_sgd_step(FlowGRPO, "grpo")
    ratio = (gaussian_log_prob(traj.latents[:, 2], mean, std.view(-1, 1, 1, 1)) - traj.log_probs[:, 1]).exp()
    assert ratio[0] > 1.0 > ratio[1]  # the positive sample became likelier, the negative one less likely


def test_grpo_refuses_human_labels_and_d3po_keeps_pairs(tmp_path):
    with pytest.raises(UserError, match="grpo needs a reward for every sample"):
        load_config(ROOT / "configs/toy_grpo.yaml", ["online.reward=null", f"online.labels={tmp_path / 'l.jsonl'}"])
    with pytest.raises(UserError, match="d3po is defined for groups of 2: online.group_size must be 2"):
        load_config(ROOT / "configs/toy_d3po.yaml", ["online.group_size=4"])
    with pytest.raises(UserError, match="advantage_std"):
        load_config(ROOT / "configs/toy_grpo.yaml", ["objective.options.advantage_std=batch"])
