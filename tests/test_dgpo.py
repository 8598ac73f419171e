"""Direct Group Preference Optimization on the round driver: the loss against the authors' train_sd3_dgpo.py step
written out by hand (flow and epsilon models), its gradient against the paper's group-level DPO objective's, the
gradient's direction on a model, whole groups with one noise level and noise per batch, the deterministic sampler
it may use, and the old policy taking over the rollouts (exact resume: tests/test_nft.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forward_process_step import errors_around_one_step

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule
from diffalign.errors import UserError
from diffalign.objectives import DGPO
from diffalign.objectives.dgpo import clipped_error, group_weights
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.train import load_config
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


def _dgpo(backbone, group_size: int = 2, **options) -> DGPO:
    objective = DGPO(ObjectiveConfig(name="dgpo", loss="dgpo", sample_steps=10, options=options), backbone)
    objective.units_per_group = group_size
    objective.attach(backbone.denoiser)
    return objective


def _nudged(module: torch.nn.Module, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}


def test_the_weighted_loss_has_the_group_dpo_objectives_gradient():
    """The authors' loss mean_i sg(sigma(S_g)) A_i e_i has the gradient of the paper's -sum_g log sigma(-S_g), S_g =
    beta / K sum_i A_i (e_i - e_ref,i), up to the constant beta B / K (B rows, groups of K)."""
    g = torch.Generator().manual_seed(0)
    error = torch.rand(6, generator=g, dtype=torch.float64).requires_grad_()
    reference_error = torch.rand(6, generator=g, dtype=torch.float64)
    advantage = torch.tensor([1.2, -0.4, -0.8, 0.3, 0.9, -1.2], dtype=torch.float64)
    beta, k = 7.0, 3
    weights = group_weights(advantage, error, reference_error, k, beta)
    (weights * advantage * error).mean().backward()
    ours = error.grad.clone()
    error.grad = None
    s = (advantage * (error - reference_error)).view(2, 3).sum(dim=1) * beta / k
    (-torch.nn.functional.logsigmoid(-s).sum()).backward()
    torch.testing.assert_close(error.grad, ours * beta * 6 / k)
    # by hand: group 0's S = 7/3 (1.2 d0 - 0.4 d1 - 0.8 d2)
    d = (error - reference_error).detach()
    expected = torch.sigmoid(torch.tensor(7 / 3, dtype=torch.float64) * (1.2 * d[0] - 0.4 * d[1] - 0.8 * d[2]))
    torch.testing.assert_close(weights[:3], expected.repeat(3))


def test_the_clip_stops_the_gradient_only_beyond_the_range_in_the_advantages_direction():
    error = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    old = torch.tensor([1.5, 0.5, 1.5, 0.5])  # ratios exp(old - e): above, below, above, below 1
    advantage = torch.tensor([1.0, 1.0, -1.0, -1.0])
    clipped, beyond = clipped_error(error, old, advantage, 0.1)
    assert beyond.tolist() == [True, False, False, True]
    clipped.sum().backward()
    assert error.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(clipped.detach(), error.detach())


@pytest.mark.parametrize("model", ["toy", "tiny-sd3"])
def test_loss_is_the_authors_step_by_hand(model):
    pipe = load_pipeline(TOY_BASE) if model == "toy" else load_pipeline(ROOT / "assets/models" / model, random_init=True)
    backbone = backbone_for(pipe)
    objective = _dgpo(backbone, kl_coef=0.3, beta=50.0, ratio_clip=0.01, reference_guidance_scale=3.0)
    objective.trailing.weights.tensors.update(  # the old policy a few steps behind
        {n: v for n, v in _nudged(backbone.denoiser, 0).items() if n in objective.trailing.weights.tensors})
    reference = (load_pipeline(TOY_BASE).unet if model == "toy"
                 else load_pipeline(ROOT / "assets/models" / model, random_init=True, seed=1).transformer)
    with torch.no_grad():
        for name, value in _nudged(reference, 1, 0.05).items():
            reference.get_parameter(name).copy_(value)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 16, 16, generator=g)
    noise = torch.randn(2, 4, 16, 16, generator=g).repeat_interleave(2, dim=0)  # one noise per group of 2
    randomness = {"step": torch.tensor([2, 2, 7, 7]), "noise": noise}
    advantage = torch.tensor([1.5, -1.5, -8.0, 3.0])  # -8 clipped to -5
    cond = backbone.encode_prompts(["a red circle", "a red circle", "a blue square", "a blue square"])
    loss, metrics = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, reference,
                              advantage=advantage)

    rule = StepRule(backbone, 10, 1.0, (4, 16, 16))
    uncond = backbone.encode_prompts([""])
    errors, base_errors, old_errors, kls = [], [], [], []
    with torch.no_grad():
        for i, k in enumerate([2, 2, 7, 7]):
            if rule.flow:  # the authors' x_t = (1 - t) x0 + t eps and velocity target eps - x0, t = sigma
                t = rule.sigmas[k]
                xt, target = (1 - t) * x0[i:i + 1] + t * noise[i:i + 1], noise[i:i + 1] - x0[i:i + 1]
            else:  # an epsilon model: DDPM's noising at the step's timestep, target eps
                alpha_bar = backbone.scheduler.alphas_cumprod[int(rule.timesteps[k])]
                xt, target = alpha_bar.sqrt() * x0[i:i + 1] + (1 - alpha_bar).sqrt() * noise[i:i + 1], noise[i:i + 1]
            run = lambda net, c: backbone.predict(xt, rule.timesteps[k:k + 1], c, denoiser=net)  # noqa: E731
            v, old = run(backbone.denoiser, cond[i:i + 1]), run(objective.trailing.denoiser(), cond[i:i + 1])
            ref_c, ref_u = run(reference, cond[i:i + 1]), run(reference, uncond)
            ref = ref_u + 3.0 * (ref_c - ref_u)  # the authors' kl_cfg on the frozen reference
            errors.append(((v - target) ** 2).mean())
            base_errors.append(((ref - target) ** 2).mean())
            old_errors.append(((old - target) ** 2).mean())
            kls.append(((v - ref) ** 2).mean())
    e, e_ref, e_old = torch.stack(errors), torch.stack(base_errors), torch.stack(old_errors)
    a = advantage.clamp(-5, 5)
    s = (a * (e - e_ref)).view(2, 2).sum(dim=1) * 50.0 / 2
    weights = torch.sigmoid(s).repeat_interleave(2)
    ratio = torch.exp(e_old - e)
    beyond = torch.where(a > 0, ratio > 1.01, ratio < 0.99)
    expected = (weights * a * e).mean() + 0.3 * torch.stack(kls).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["group_weight"], weights.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["clip_fraction"], beyond.float().mean())
    assert 0 < beyond.sum() < 4  # the nudged old policy puts some ratios beyond the clip


def test_a_step_fits_the_better_half_of_a_group_better_and_the_worse_one_worse():
    before, after = errors_around_one_step(lambda backbone: _dgpo(backbone, kl_coef=0.0, ratio_clip=0.0),
                                           advantage=1.0, lr=1e-1, step=3, seed=3, shared_noise=True, reference=True)
    assert after[0] < before[0] and after[1] > before[1]


def test_a_batch_is_whole_groups_each_at_one_step_with_one_noise():
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = _dgpo(backbone, group_size=4)
    g = torch.Generator().manual_seed(0)
    units, steps = objective.choose_units(32, torch.tensor([5, 6, 7, 8, 9]), 12, g)
    groups = units.view(3, 4)
    assert (groups % 4 == torch.arange(4)).all() and (groups // 4 == groups[:, :1] // 4).all()
    assert (steps.view(3, 4) == steps.view(3, 4)[:, :1]).all() and set(steps.tolist()) <= {5, 6, 7, 8, 9}
    noise = objective.draw(12, (4, 8, 8), g)["noise"].view(3, 4, -1)
    assert torch.equal(noise, noise[:, :1].expand_as(noise)) and not torch.equal(noise[0], noise[1])
    own = _dgpo(backbone, group_size=4, group_noise=False).draw(12, (4, 8, 8), g)["noise"].view(3, 4, -1)
    assert not torch.equal(own[:, 0], own[:, 1])


def test_the_configs_rules():
    toy = CONFIGS / "toy_dgpo.yaml"
    with pytest.raises(UserError, match="multiple of the group size 8"):
        load_config(toy, ["train.batch_size=12"])
    load_config(toy, ["objective.sample_eta=0"])  # the deterministic sampler: no log-probabilities needed
    with pytest.raises(UserError, match="grpo trains on the sampler's step log-probabilities"):
        load_config(CONFIGS / "toy_grpo.yaml", ["objective.sample_eta=0"])


def test_the_old_policy_samples_the_rounds_after_the_switch():
    backbone = backbone_for(load_pipeline(TOY_BASE))
    objective = _dgpo(backbone, old_samples_after=2)
    for _ in range(2):
        objective.after_optimizer_step()
        assert objective.sampling_denoiser() is None
    objective.after_optimizer_step()
    assert objective.sampling_denoiser() is not None


def test_the_deterministic_sampler_draws_no_noise_and_records_no_log_probabilities():
    from diffalign.diffusion.logprob import sample_trajectories

    backbone = backbone_for(load_pipeline(TOY_BASE))
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    runs = [sample_trajectories(backbone, noise, cond, steps=4, eta=0.0, generator=torch.Generator().manual_seed(s))
            for s in (1, 2)]
    assert torch.equal(runs[0].latents, runs[1].latents) and not runs[0].log_probs.any()
    stochastic = sample_trajectories(backbone, noise, cond, steps=4, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(stochastic.final, runs[0].final)
