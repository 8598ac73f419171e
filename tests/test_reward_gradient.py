"""Fine-tuning through a differentiable reward's gradient (DRaFT-K, DRaFT-LV, AlignProp, ReFL): each loss and its
gradient against the sampling written out by hand (which steps keep their gradient, the re-noised last step, the
one-step x_0 prediction), checkpointed steps equal to kept ones, AlignProp's random start, a step that raises the
reward, the config's rules, and exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule, guided_output
from diffalign.errors import UserError
from diffalign.objectives import AlignProp, DRaFT, ReFL
from diffalign.paths import ASSETS, CONFIGS
from diffalign.rewards import ToyPreferenceSoft
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def backbone():
    """A tiny random SD1.5 (an epsilon UNet, as the toy base, at a fraction of its cost to backpropagate)."""
    return backbone_for(load_pipeline(ASSETS / "models" / "tiny-sd15", random_init=True))


def _objective(cls, backbone, guidance: float = 1.0, **options):
    config = ObjectiveConfig(name=cls.__name__.lower(), loss=cls.__name__.lower(), sample_steps=STEPS, sample_eta=1.0,
                             sample_guidance_scale=guidance, options=options)
    objective = cls(config, backbone)
    objective.rewards = [(ToyPreferenceSoft(), 1.0)]
    return objective


def _inputs(backbone, objective, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = backbone.latent_shape(32)
    noise = torch.randn((2, *shape), generator=g)
    randomness = {"step_noise": torch.randn((2, STEPS, *shape), generator=g), **objective.draw(2, shape, g)}
    return noise[:, None], backbone.encode_prompts(PROMPTS), randomness


def _gradients(backbone, loss) -> list[torch.Tensor]:
    params = [p for p in backbone.denoiser.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _by_hand(backbone, noise, cond, step_noise, first_trained: int, stop: int = STEPS, guidance: float = 1.0):
    """The sampler from noise, the model's output detached before ``first_trained``; x after ``stop`` steps."""
    rule = StepRule(backbone, STEPS, 1.0, tuple(noise.shape[1:]))
    uncond = backbone.encode_prompts(["", ""]) if guidance != 1.0 else None
    x = noise
    for k in range(stop):
        output = guided_output(backbone, x, rule.timesteps[k:k + 1], cond, uncond, guidance, backbone.denoiser)
        if k < first_trained:
            output = output.detach()
        mean, std = rule.distribution(k, x, output)
        x = mean + std * step_noise[:, k]
    return rule, x


def _reward(backbone, latents) -> torch.Tensor:
    return ToyPreferenceSoft().score_with_gradient(backbone.decode_latents(latents).float().add(1).div(2), PROMPTS)


@pytest.mark.parametrize("k, guidance", [(1, 1.0), (2, 3.0)])
def test_draft_k_is_the_reward_through_the_last_k_steps_by_hand(backbone, k, guidance):
    objective = _objective(DRaFT, backbone, guidance, k=k)
    noise, cond, randomness = _inputs(backbone, objective)
    loss, metrics = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    _, final = _by_hand(backbone, noise[:, 0], cond, randomness["step_noise"], STEPS - k, guidance=guidance)
    expected = -_reward(backbone, final).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_gradients(backbone, loss), _gradients(backbone, expected)):
        if theirs is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    assert metrics["first_trained_step"] == STEPS - k


def test_checkpointed_steps_give_the_gradient_of_kept_ones(backbone):
    grads = []
    for checkpointed in (True, False):
        objective = _objective(DRaFT, backbone, k=3, checkpoint_steps=checkpointed)
        noise, cond, randomness = _inputs(backbone, objective)
        loss, _ = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
        grads.append([g for g in _gradients(backbone, loss) if g is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_draft_lv_denoises_the_renoised_sample_with_gradients_by_hand(backbone):
    objective = _objective(DRaFT, backbone, lv_samples=2)
    noise, cond, randomness = _inputs(backbone, objective)
    loss, _ = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    rule, clean = _by_hand(backbone, noise[:, 0], cond, randomness["step_noise"], STEPS)
    rewards = []
    for i in range(2):  # the clean sample noised afresh to the last step's level, then that step with gradients
        a, b = rule.coefficients(STEPS - 1)
        x = a * clean.detach() + b * randomness["lv_noise"][:, i]
        output = guided_output(backbone, x, rule.timesteps[STEPS - 1:], cond, None, 1.0, backbone.denoiser)
        mean, std = rule.distribution(STEPS - 1, x, output)
        rewards.append(_reward(backbone, mean + std * randomness["step_noise"][:, STEPS - 1]))
    expected = -torch.cat(rewards).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    ours = [g for g in _gradients(backbone, loss) if g is not None]
    theirs = [g for g in _gradients(backbone, expected) if g is not None]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_refl_follows_the_reward_of_one_x0_prediction_by_hand(backbone):
    objective = _objective(ReFL, backbone, stop_from=0.5)  # steps 2 or 3 of 4
    noise, cond, randomness = _inputs(backbone, objective)
    stop = int(randomness["stop"][0])
    assert stop in (2, 3) and set(objective.draw(200, (4, 8, 8), torch.Generator().manual_seed(0))["stop"].tolist()) == {2, 3}
    loss, _ = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    rule, x = _by_hand(backbone, noise[:, 0], cond, randomness["step_noise"], stop, stop=stop)
    output = guided_output(backbone, x, rule.timesteps[stop:stop + 1], cond, None, 1.0, backbone.denoiser)
    alpha_bar = backbone.scheduler.alphas_cumprod[int(rule.timesteps[stop])]
    x0 = (x - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()  # the epsilon model's pred_original_sample
    expected = 1e-3 * torch.relu(2.0 - _reward(backbone, x0)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    for a, b in zip([g for g in _gradients(backbone, loss) if g is not None],
                    [g for g in _gradients(backbone, expected) if g is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_alignprop_starts_at_a_random_step_and_equals_draft_from_there(backbone):
    objective = _objective(AlignProp, backbone)
    starts = objective.draw(4000, (4, 8, 8), torch.Generator().manual_seed(0))["first_trained"].float()
    assert starts.min() >= 1 and starts.max() <= STEPS - 1
    wide = AlignProp(ObjectiveConfig(name="alignprop", loss="alignprop", sample_steps=50), backbone)
    drawn = wide.draw(4000, (4, 8, 8), torch.Generator().manual_seed(0))["first_trained"].float()
    # the authors' b = int(N(42, 5)) redrawn until 1 <= b <= 49: b with probability P(b <= X < b + 1), renormalised
    normal = torch.distributions.Normal(42.0, 5.0)
    b = torch.arange(1, 50, dtype=torch.float64)
    mass = normal.cdf(b + 1) - normal.cdf(b)
    assert abs(drawn.mean().item() - float((b * mass).sum() / mass.sum())) < 0.3
    fixed = _objective(AlignProp, backbone, start_mean=0.5, start_std=0.0)
    noise, cond, randomness = _inputs(backbone, fixed)
    assert set(randomness["first_trained"].tolist()) == {2}
    loss, _ = fixed(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    draft = _objective(DRaFT, backbone, k=2)
    reference, _ = draft(backbone, noise, cond, {"step_noise": randomness["step_noise"]}, backbone.denoiser, None,
                         prompts=PROMPTS)
    torch.testing.assert_close(loss, 0.01 * reference)


def test_a_step_along_the_gradient_raises_the_reward(backbone):
    objective = _objective(DRaFT, backbone, k=2)
    noise, cond, randomness = _inputs(backbone, objective, seed=3)
    loss, before = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    params = [p for p in backbone.denoiser.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= 1e-2 * g / max(g.norm().item(), 1e-12)
            _, after = objective(backbone, noise, cond, randomness, backbone.denoiser, None, prompts=PROMPTS)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    assert after["reward"] > before["reward"]


def test_the_configs_rules():
    with pytest.raises(UserError, match="jpeg_compressibility has none"):
        load_config(CONFIGS / "toy_draft.yaml", ["online.reward=jpeg_compressibility"])
    with pytest.raises(UserError, match="win rates"):
        load_config(CONFIGS / "toy_draft.yaml", ["online.reward_as=win_rate"])
    with pytest.raises(UserError, match="from text prompts alone"):
        load_config(CONFIGS / "toy_draft.yaml", ["data.source_columns=[source]"])
    with pytest.raises(UserError, match="exceeds the sampler's 20 steps"):
        train(load_config(CONFIGS / "toy_draft.yaml", ["objective.options.k=21", "output_dir=/nonexistent/x"]))


@pytest.mark.slow
@pytest.mark.parametrize("config, own", [("toy_draft.yaml", ["objective.options.k=2"]), ("toy_alignprop.yaml", []),
                                         ("toy_refl.yaml", [])])
def test_a_reward_gradient_run_resumes_exactly(config, own, tmp_path):
    small = ["objective.sample_steps=4", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2",
             "validation.every=0", "validation.prompt_file=null", *own]
    train(load_config(CONFIGS / config, [f"output_dir={tmp_path / 'straight'}", *small]))
    train(load_config(CONFIGS / config, [f"output_dir={tmp_path / 'split'}", *small, "train.max_steps=2"]))
    train(load_config(CONFIGS / config, [f"output_dir={tmp_path / 'split'}", *small, "train.resume=latest"]))
    a = load_file(str(tmp_path / "straight/final/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split/final/pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
