"""Advantage Weighted Matching on the round driver: the loss against the authors' train_sd3_awm.py step written out by
hand (flow and epsilon models, every weighting), the gradient's direction and the trailing anchor's decay (exact
resume with the anchor: tests/test_nft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forward_process_step import errors_around_one_step

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule
from diffalign.objectives import AWM
from diffalign.paths import TOY_BASE
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


def _awm(backbone, **options) -> AWM:
    objective = AWM(ObjectiveConfig(name="awm", loss="awm", sample_steps=10, options=options), backbone)
    objective.attach(backbone.denoiser)
    return objective


@pytest.mark.parametrize("model, weighting", [("toy", "t2"), ("tiny-sd3", "ghuber")])  # the others: below
def test_loss_is_the_authors_step_by_hand(model, weighting):
    pipe = load_pipeline(TOY_BASE) if model == "toy" else load_pipeline(ROOT / "assets/models" / model, random_init=True)
    backbone = backbone_for(pipe)
    objective = _awm(backbone, weighting=weighting, kl_coef=0.3, anchor_coef=0.7)
    torch.manual_seed(0)  # the anchor a few steps behind: the policy's weights nudged
    objective.trailing.weights.tensors.update({n: t + 0.02 * torch.randn_like(t) for n, t in objective.trailing.weights.tensors.items()})
    reference = load_pipeline(TOY_BASE).unet if model == "toy" else \
        load_pipeline(ROOT / "assets/models" / model, random_init=True, seed=1).transformer
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    randomness = {"step": torch.tensor([1, 4, 8]), "noise": torch.randn(3, 4, 16, 16, generator=g)}
    advantage = torch.tensor([2.5, -7.0, 0.0])  # scaled to 0.5, -1 (clipped at -5), 0
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    loss, metrics = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, reference,
                              advantage=advantage)

    rule = StepRule(backbone, 10, 1.0, (4, 16, 16))
    policy_terms, kl_terms, anchor_terms, log_probs = [], [], [], []
    with torch.no_grad():
        for i, k in enumerate([1, 4, 8]):
            noise = randomness["noise"][i:i + 1]
            if rule.flow:  # the authors' x_t = (1 - t) x0 + t eps and velocity target eps - x0, t = sigma
                t = rule.sigmas[k]
                xt, target = (1 - t) * x0[i:i + 1] + t * noise, noise - x0[i:i + 1]
            else:  # an epsilon model: DDPM's noising at the step's timestep, target eps, t = timestep / 1000
                alpha_bar = backbone.scheduler.alphas_cumprod[int(rule.timesteps[k])]
                t = rule.timesteps[k] / 1000
                xt, target = alpha_bar.sqrt() * x0[i:i + 1] + (1 - alpha_bar).sqrt() * noise, noise
            run = lambda net: backbone.predict(xt, rule.timesteps[k:k + 1], cond[i:i + 1], denoiser=net)  # noqa: E731
            v, ref, anchor = run(backbone.denoiser), run(reference), run(objective.trailing.denoiser())
            e = ((v - target) ** 2).mean().double()
            log_prob = {"uniform": -e, "t": -e * t, "t2": -e * t ** 2,
                        "ghuber": -((e + 1e-10) ** 0.25 - 1e-10 ** 0.25) * t / 0.25}[weighting]
            log_probs.append(log_prob)
            policy_terms.append(-[0.5, -1.0, 0.0][i] * 1.0)  # -A * ratio, the ratio exp(0) = 1
            kl_terms.append(((v - ref) ** 2).mean())
            anchor_terms.append(((v - anchor) ** 2).mean())
    expected = sum(policy_terms) / 3 + 0.3 * torch.stack(kl_terms).mean() + 0.7 * torch.stack(anchor_terms).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["kl"].item() == pytest.approx(torch.stack(kl_terms).mean().item(), rel=1e-4)
    assert metrics["log_likelihood"].item() == pytest.approx(torch.stack(log_probs).mean().item(), rel=1e-4)


def test_the_gradient_is_the_advantage_times_the_weighted_matching_losss_gradient():
    """d L / d theta = -mean_i A_i d l_i / d theta, l_i the weighted matching log-likelihood (ratio 1 on-policy)."""
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = _awm(backbone, kl_coef=0.0, anchor_coef=0.0, weighting="t")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    randomness = {"step": torch.tensor([3, 6]), "noise": torch.randn(2, 4, 16, 16, generator=g)}
    cond = backbone.encode_prompts(["a red circle", "a red circle"])
    loss, _ = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, None,
                        advantage=torch.tensor([5.0, -2.5]))
    params = [p for p in backbone.denoiser.parameters() if p.requires_grad][-4:]
    got = torch.autograd.grad(loss, params)
    rule = StepRule(backbone, 10, 1.0, (4, 16, 16))
    xt = rule.noised(x0, [3, 6], randomness["noise"])
    out = backbone.predict(xt, rule.timesteps[[3, 6]], cond)
    e = (out - randomness["noise"]).pow(2).flatten(1).mean(1)
    log_likelihood = -e * rule.timesteps[[3, 6]] / 1000
    expected = torch.autograd.grad(-(torch.tensor([1.0, -0.5]) * log_likelihood).mean(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_step_fits_good_samples_better_and_bad_ones_worse():
    before, after = errors_around_one_step(lambda backbone: _awm(backbone, kl_coef=0.0, anchor_coef=0.0),
                                           advantage=5.0, lr=1e-3)
    assert after[0] < before[0] and after[1] > before[1]


def test_the_anchor_trails_the_policy_with_the_authors_linear_decay():
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = _awm(backbone, anchor_decay=0.3)
    name = next(iter(objective.trailing.weights.tensors))
    live = dict(backbone.denoiser.named_parameters())[name]
    start = objective.trailing.weights.tensors[name].clone()
    with torch.no_grad():
        live.add_(1.0)  # the policy moved by one everywhere
    objective.after_optimizer_step()  # global step 1: decay 0.001
    torch.testing.assert_close(objective.trailing.weights.tensors[name], start + 0.999)
    objective.trailing.optimizer_steps = 999
    before = objective.trailing.weights.tensors[name].clone()
    objective.after_optimizer_step()  # step 1000: min(0.3, 1.0) = 0.3
    torch.testing.assert_close(objective.trailing.weights.tensors[name], 0.3 * before + 0.7 * live.detach())
    assert _awm(backbone, anchor_coef=0.0).trailing is None  # no anchor, no second weight set


def test_every_weighting_by_hand():
    """The authors' compute_log_prob_awm on errors e at noise levels t; the model-level test checks it in place."""
    from diffalign.objectives.awm import matching_log_likelihood

    e, t = torch.tensor([0.04, 0.5]), torch.tensor([0.3, 0.9])
    expected = {"uniform": -e, "t": -e * t, "t2": -e * t ** 2,
                "ghuber": -((e.double() + 1e-10) ** 0.5 - 1e-10 ** 0.5) * t / 0.5}
    for weighting, value in expected.items():
        got = matching_log_likelihood(e, t, weighting, power=0.5)
        torch.testing.assert_close(got, value.double(), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="unknown AWM weighting"):
        matching_log_likelihood(e, t, "huber")
