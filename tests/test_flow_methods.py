"""The inversion methods on flow-matching models (tiny SD3 and tiny FLUX.1): the Euler inversion of the
probability-flow ODE and its ReNoise refinement, and InPO, SmPO and Self-NPO computed by hand in sigmas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.inversion import ddim_invert, ddim_invert_to, ddim_sample
from diffalign.objectives import InPO, SelfNPO, SmPO
from diffalign.objectives.self_npo import truncation_grid
from diffalign.train.config import ObjectiveConfig

MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"
FLOW_MODELS = ["tiny-sd3", "tiny-flux", "tiny-flux2-klein", "tiny-zimage", "tiny-qwenimage"]
TINY = {"sd3": "tiny-sd3", "flux": "tiny-flux", "flux2": "tiny-flux2-klein", "zimage": "tiny-zimage",
        "qwenimage": "tiny-qwenimage"}
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module", params=FLOW_MODELS)
def flow(request):
    return backbone_for(load_pipeline(MODELS / request.param, random_init=True, seed=0))


def _sigmas(backbone) -> torch.Tensor:
    """The training sigmas, increasing with the index as diffalign's flow timesteps do."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler.config)
    return scheduler.sigmas[:1000].flip(0).float()


def _velocity(backbone, x, sigma, cond):
    """The model's velocity at noise level ``sigma`` (a float or one per item): the transformer sees sigma * 1000."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
    with torch.no_grad():
        return backbone.predict(x, sigma * 1000, cond).float()


def test_flux_predict_is_the_pipelines_own_packed_call():
    """FluxBackbone.predict packs, ids and unpacks as FluxPipeline does, with the distilled guidance embedding."""
    pipe = load_pipeline(MODELS / "tiny-flux", random_init=True)
    backbone = backbone_for(pipe, distilled_guidance=2.0)
    cond = backbone.encode_prompts(PROMPTS)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 4, 16, 16)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=packed, timestep=torch.tensor([0.5, 0.02]), guidance=torch.full((2,), 2.0),
                               pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                               txt_ids=torch.zeros(cond.embeds.shape[1], 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                               return_dict=False)[0]
        ours = backbone.predict(latents, torch.tensor([500.0, 20.0]), cond)
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(out, 32, 32, backbone.vae_scale_factor))
    assert backbone.latent_shape(32) == (4, 16, 16)


def test_sampling_is_the_euler_scheduler_on_the_same_sigmas(flow):
    """ddim_sample on a flow model steps x += (sigma' - sigma) v, as FlowMatchEulerDiscreteScheduler.step does."""
    cond = flow.encode_prompts(PROMPTS)
    noise = torch.randn(2, *flow.latent_shape(32), generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(flow, noise, cond, steps=5)
    sigmas = _sigmas(flow)[[800, 600, 400, 200, 0]].tolist()  # the grid 0, 200, ..., 800 from the noisy end
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the sigmas given are already shifted
    scheduler.set_timesteps(sigmas=sigmas)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(_velocity(flow, x, t / 1000, cond), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_euler_inversion_then_sampling_reconstructs_and_renoise_is_tighter(flow):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(3, *flow.latent_shape(32), generator=g)
    cond = flow.encode_prompts(["a red circle", "a blue square", "a green triangle"])

    def relative_error(renoise_iterations: int) -> float:
        trajectory = ddim_invert(flow, latents, cond, steps=10, renoise_iterations=renoise_iterations)
        rebuilt = ddim_sample(flow, trajectory[-1], cond, steps=10)
        return float((rebuilt - latents).norm() / latents.norm())

    plain, renoised = relative_error(0), relative_error(3)
    # measured (random tiny weights, 10 steps): SD3 plain 0.029, ReNoise 0.0035; FLUX plain 0.027, ReNoise 0.0027
    assert plain < 0.1 and renoised < plain / 5


def test_inverting_each_latent_to_its_own_timestep_matches_the_full_flow_inversion(flow):
    latents = torch.randn(3, *flow.latent_shape(32), generator=torch.Generator().manual_seed(2))
    cond = flow.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    batched = ddim_invert_to(flow, latents, cond, torch.tensor([0, 300, 900]), steps=10)
    trajectory = ddim_invert(flow, latents, cond, steps=10)
    for i, t in enumerate([0, 300, 900]):
        torch.testing.assert_close(batched[i], trajectory[t // 100 + 1][i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("renoise", [0, 1])
def test_inversion_dpo_scores_each_image_at_its_euler_inverted_latent_by_hand(flow, renoise):
    """InPO (renoise 0) and SmPO's ReNoise inversion (renoise 1, the plain estimate averaged in) on a flow model:
    x_t by explicit Euler up the sigma grid, the target the velocity (x_t - x_0) / sigma_t of the straight line
    through it, the reference a LoRA-free copy nudged away."""
    reference = load_pipeline(MODELS / TINY[flow.family], random_init=True,
                              seed=1).transformer
    objective = InPO(ObjectiveConfig(name="inpo", beta=2500.0, options={"inversion_steps": 10, "inversion_eta": 0.0, "renoise_iterations": renoise}), flow)
    objective.renoise_average_from = 0
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, *flow.latent_shape(32), generator=g)
    cond = flow.encode_prompts(PROMPTS)
    loss, _ = objective(flow, latents, cond, {"timesteps": torch.tensor([450, 120]),
                                              "inversion_seed": torch.tensor([7])}, flow.denoiser, reference)

    sig = _sigmas(flow)
    expected = []
    for pair, t, path in [(0, 450, [None, 0, 100, 200, 300, 400, 450]), (1, 120, [None, 0, 100, 120])]:
        c = cond[pair:pair + 1].repeat_items(2)
        x0 = latents[pair]
        x = x0.clone()
        for prev, nxt in zip(path[:-1], path[1:]):
            at = sig[prev or 0]  # from the clean latent the model is asked at the grid's first point
            start = 0.0 if prev is None else at  # ... but x is the clean latent itself: sigma 0, x0 = x

            def moved(eps, x=x, start=start, end=sig[nxt]):
                """The DDIM move keeping (x0, eps): x0 = (x - start eps) / (1 - start)."""
                return (1 - end) * (x - start * eps) / (1 - start) + end * eps

            estimates = [x + (1 - at) * _velocity(flow, x, at, c)]  # eps = x + (1 - sigma) v
            for _ in range(renoise):
                ahead = moved(estimates[-1])
                estimates.append(ahead + (1 - sig[nxt]) * _velocity(flow, ahead, sig[nxt], c))
            x = moved(torch.stack(estimates).mean(0))
        target = (x - x0) / sig[t]  # velocity eps^ - x0 with eps^ = (x_t - (1 - sigma) x0) / sigma
        step = torch.full((2,), float(sig[t] * 1000))
        with torch.no_grad():
            policy, ref = ((flow.predict(x, step, c, denoiser=net) - target).pow(2).mean(dim=(1, 2, 3))
                           for net in (flow.denoiser, reference))
        expected.append(-F.logsigmoid(-2500.0 * ((policy[0] - ref[0]) - (policy[1] - ref[1]))))
    # Qwen-Image's masked text attention adds up in another order when its prompts are batched apart (as here)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-3 if flow.family == "qwenimage"
                                        else 1e-4)


def test_smpo_on_a_flow_model_uses_one_renoise_refinement_by_default(flow):
    objective = SmPO(ObjectiveConfig(name="smpo", loss="smpo", beta=25000.0), flow)
    assert (objective.renoise_iterations, objective.renoise_average_from, objective.inversion_eta) == (1, 0, 0.0)


def test_self_npo_on_a_flow_model_is_the_truncated_loop_in_sigmas_by_hand(flow):
    """Self-NPO's steps with a_t = 1 - sigma_t, b_t = sigma_t: the teacher's Euler moves down the grid with the
    unconditional velocity (guidance 0), its x0 estimate x - sigma v, the student's renoised x_s (pure noise when
    s lands on sigma = 1) and the pseudo-Huber loss against the teacher's x0."""
    objective = SelfNPO(ObjectiveConfig(name="self_npo", loss="huber"), flow)
    objective.attach(flow.denoiser)  # the EMA teacher starts as the student
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *flow.latent_shape(32), generator=g)
    randomness = {"start": torch.tensor([2, 10, 24]), "noise": torch.randn(3, *flow.latent_shape(32), generator=g),
                  "renoise": torch.randn(3, *flow.latent_shape(32), generator=g), "level": torch.tensor([0.3, 0.0, 1.0])}
    cond = flow.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    loss, metrics = objective(flow, x0[:, None], cond, randomness, flow.denoiser, None)

    sig, grid = _sigmas(flow), truncation_grid(1000, 25)
    uncond = flow.encode_prompts([""])
    predictions, targets, teacher_t = [], [], []
    for i in range(3):
        start = int(randomness["start"][i])
        t = int(grid[start])
        x = (1 - sig[t]) * x0[i:i + 1] + sig[t] * randomness["noise"][i:i + 1]
        for move in range(min(start + 1, 5)):
            v = _velocity(flow, x, sig[t], uncond)
            x0_hat, eps = x - sig[t] * v, x + (1 - sig[t]) * v
            t = int(grid[start - move - 1]) if start - move - 1 >= 0 else 0
            x = (1 - sig[t]) * x0_hat + sig[t] * eps
        targets.append(x - sig[t] * _velocity(flow, x, sig[t], uncond))
        teacher_t.append(t)
        s = min(t + 1 + int(float(randomness["level"][i]) * (999 - t)), 999)
        kept = (1 - sig[s]) / (1 - sig[t])
        x_s = kept * x + (sig[s] ** 2 - (kept * sig[t]) ** 2).clamp(min=0).sqrt() * randomness["renoise"][i:i + 1]
        predictions.append(x_s - sig[s] * _velocity(flow, x_s, sig[s], cond[i:i + 1]))
    d = torch.cat(predictions) - torch.cat(targets)
    expected = (d.pow(2) + 0.001 ** 2).sqrt().mean() - 0.001
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert metrics["teacher_t"].item() == pytest.approx(sum(teacher_t) / 3)
    assert teacher_t == [0, int(grid[5]), int(grid[19])]


@pytest.mark.parametrize("model", ["toy", "tiny-sd3"])
def test_stochastic_inversion_adds_the_posterior_deviation_after_each_move_but_the_first(model):
    """InPO's eta: after each DDIM move but the first, eta * sigma * z with sigma DDPM's posterior deviation
    sqrt((1 - A_from) / (1 - A_to) (1 - A_to / A_from)) in alpha-bars; on a flow model A = a^2 / (a^2 + b^2) of its
    x_t = a x_0 + b eps (the variance-preserving x_t it scales) and sigma scaled by sqrt(a^2 + b^2) at the end."""
    from diffalign.diffusion import schedule_for
    from diffalign.paths import TOY_BASE

    pipe = load_pipeline(TOY_BASE) if model == "toy" else load_pipeline(MODELS / model, random_init=True)
    backbone = backbone_for(pipe)
    schedule = schedule_for(backbone.scheduler)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = backbone.encode_prompts(["a red circle"])
    ours = ddim_invert_to(backbone, x0, cond, torch.tensor([300]), steps=10, eta=0.5,
                          generator=torch.Generator().manual_seed(9))

    def coefficients(t):
        if t is None:
            return torch.tensor(1.0), torch.tensor(0.0)
        a, b = schedule.coefficients(torch.tensor([t]))
        return a[0], b[0]

    z = torch.Generator().manual_seed(9)
    x = x0.clone()
    path = [None, 0, 100, 200, 300]
    with torch.no_grad():
        for move, (prev, nxt) in enumerate(zip(path[:-1], path[1:])):
            (a_from, b_from), (a_to, b_to) = coefficients(prev), coefficients(nxt)
            t_model = schedule.model_timesteps(torch.tensor([prev or 0]))
            _, eps = schedule.split(backbone.predict(x, t_model, cond), x, torch.tensor([prev or 0]))
            x = a_to * (x - b_from * eps) / a_from + b_to * eps
            if move:
                big_from = a_from**2 / (a_from**2 + b_from**2)
                big_to = a_to**2 / (a_to**2 + b_to**2)
                sigma = ((1 - big_from) / (1 - big_to) * (1 - big_to / big_from)).sqrt()
                x = x + 0.5 * (a_to**2 + b_to**2).sqrt() * sigma * torch.randn(x.shape, generator=z)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
