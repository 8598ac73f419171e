"""DisCO on the round driver: the objective against the authors' compute_policy_loss_disco_logL written out by
hand (its gradient-equal surrogate for the log-mean-exp, its KL and squared-hinge constraint), groups without
both kinds of sample skipped, and a training step's direction."""

from __future__ import annotations

import pytest
import torch

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import sample_trajectories, step_log_prob
from diffalign.objectives import DisCO
from diffalign.objectives.disco import disco_objective
from diffalign.paths import TOY_BASE
from diffalign.train.config import ObjectiveConfig


def _authors_loss(log_prob, old, rewards, tau, beta, delta):
    """The authors' log-L loss for one step per sample: a value-1 surrogate whose gradient is the log-mean-exp's,
    the KL mean(old - new), and the constraint stop_gradient(beta [KL - delta]_+) * KL."""
    kl = (old - log_prob).mean()
    pos, neg = rewards == 1, rewards == 0
    valid = pos.any(1) & neg.any(1)
    s, pos, neg = log_prob[valid], pos[valid], neg[valid]
    scaled = (s / tau).masked_fill(~neg, float("-inf"))
    top = scaled.max(dim=-1, keepdim=True).values
    exp = torch.exp((s / tau - top.detach()) * neg) * neg
    total = exp.sum(dim=-1, keepdim=True)
    lme = total / (total.detach() + torch.finfo(total.dtype).eps)
    pg = (((s - tau * lme) * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True)).sum() / rewards.shape[0]
    return -pg + (beta * (kl - delta)).clamp(min=0).detach() * kl


def test_gradients_equal_the_authors_loss_and_the_value_is_the_robust_objective():
    g = torch.Generator().manual_seed(0)
    log_prob = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    old = (log_prob.detach() + 0.01 * torch.randn(3, 4, generator=g, dtype=torch.float64))
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0]])  # the second group has no negative: skipped
    objective, valid = disco_objective(log_prob, rewards == 1, tau=10.0)
    kl = (old - log_prob).mean()
    ours = -objective / 3 + (1e3 * (kl - 1e-4)).clamp(min=0).detach() * kl
    (grad_ours,) = torch.autograd.grad(ours, log_prob)
    (grad_theirs,) = torch.autograd.grad(_authors_loss(log_prob, old, rewards, 10.0, 1e3, 1e-4), log_prob)
    torch.testing.assert_close(grad_ours, grad_theirs)
    # the skipped group's samples get the KL constraint's gradient alone: -beta [KL - delta]_+ / N each
    hinge = (1e3 * (kl.detach() - 1e-4)).clamp(min=0)
    assert valid.item() == 2
    torch.testing.assert_close(grad_ours[1], torch.full((4,), -hinge.item() / 12, dtype=torch.float64))
    s = log_prob.detach()
    by_hand = (s[0, [0, 3]].mean() - 10 * torch.log(torch.exp(s[0, [1, 2]] / 10).mean())) + \
        (s[2, 1] - 10 * torch.log(torch.exp(s[2, [0, 2, 3]] / 10).mean()))
    assert objective.item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_the_objective_on_recorded_groups_and_a_step_that_separates_positives_from_negatives():
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = DisCO(ObjectiveConfig(name="disco", loss="disco", sample_steps=4, sample_guidance_scale=1.0, options={"kl_beta": 0.0}), backbone)
    cond = backbone.encode_prompts(["a red circle"])
    traj = sample_trajectories(backbone, torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
                               cond.repeat_items(4), steps=4, eta=1.0, generator=torch.Generator().manual_seed(2))
    latents, positive = traj.latents[None], torch.tensor([[True, False, True, False]])
    targets = {"positive": positive, "old_log_probs": traj.log_probs[None]}
    step = torch.tensor([1])
    loss, metrics = objective(backbone, latents, cond, {"step": step}, backbone.denoiser, None, **targets)
    s = traj.log_probs[:, 1]  # the sampler's own log-probabilities: the policy's, before any step
    expected = -(s[[0, 2]].mean() - 10 * torch.log(torch.exp(s[[1, 3]] / 10).mean()))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4) and metrics["valid_groups"].item() == 1.0
    loss.backward()
    with torch.no_grad():
        for p in backbone.denoiser.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad
        after = step_log_prob(backbone, traj.latents, torch.full((4,), 1), cond.repeat_items(4), eta=1.0)
    moved = after - s
    assert moved[[0, 2]].min() > moved[[1, 3]].max()  # positives gained more log-probability than negatives
