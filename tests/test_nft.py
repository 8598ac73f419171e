"""DiffusionNFT on the round driver: the loss against the authors' train_nft_sd3.py step written out by hand
(flow and epsilon models), the gradient's direction, and exact resume with its EMA old policy (and AWM's with its
anchor, DGPO's with its old policy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from forward_process_step import errors_around_one_step
from safetensors.torch import load_file

from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.diffusion.logprob import StepRule
from diffalign.objectives import DiffusionNFT
from diffalign.paths import TOY_BASE
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


def _nudged(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: p.detach() + 0.02 * torch.randn_like(p) for name, p in module.named_parameters()}


@pytest.mark.parametrize("model", ["toy", "tiny-sd3"])
def test_loss_is_the_authors_step_by_hand(model):
    pipe = load_pipeline(TOY_BASE) if model == "toy" else load_pipeline(ROOT / "assets/models" / model, random_init=True)
    backbone = backbone_for(pipe)
    objective = DiffusionNFT(ObjectiveConfig(name="nft", loss="nft", sample_steps=10, options={"beta": 0.5, "kl_coef": 0.3}),
                             backbone)
    objective.attach(backbone.denoiser)
    objective.trailing.weights.tensors.update({n: v for n, v in _nudged(backbone.denoiser, 0).items() if n in objective.trailing.weights.tensors})
    reference = load_pipeline(TOY_BASE).unet if model == "toy" else \
        load_pipeline(ROOT / "assets/models" / model, random_init=True, seed=1).transformer
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    randomness = {"step": torch.tensor([1, 4, 8]), "noise": torch.randn(3, 4, 16, 16, generator=g)}
    advantage = torch.tensor([2.5, -7.0, 0.0])  # r = 0.75, 0 (clipped at -5), 0.5
    cond = backbone.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    loss, _ = objective(backbone, x0[:, None], cond, randomness, backbone.denoiser, reference, advantage=advantage)

    rule = StepRule(backbone, 10, 1.0, (4, 16, 16))
    terms = []
    with torch.no_grad():
        for i, k in enumerate([1, 4, 8]):
            if rule.flow:
                sigma = rule.sigmas[k]
                a, b = 1 - sigma, sigma
            else:
                alpha_bar = backbone.scheduler.alphas_cumprod[int(rule.timesteps[k])]
                a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
            xt = a * x0[i:i + 1] + b * randomness["noise"][i:i + 1]
            t = rule.timesteps[k:k + 1]
            run = lambda net: backbone.predict(xt, t, cond[i:i + 1], denoiser=net)  # noqa: E731
            v, old, ref = run(backbone.denoiser), run(objective.trailing.denoiser()), run(reference)
            to_x0 = (lambda out: xt - b * out) if rule.flow else (lambda out: (xt - b * out) / a)
            pos = to_x0(0.5 * v + 0.5 * old)
            neg = to_x0(1.5 * old - 0.5 * v)
            w_pos = (pos - x0[i]).abs().mean().clamp(min=1e-5)
            w_neg = (neg - x0[i]).abs().mean().clamp(min=1e-5)
            r = [0.75, 0.0, 0.5][i]
            policy = (r * ((pos - x0[i]) ** 2 / w_pos).mean() + (1 - r) * ((neg - x0[i]) ** 2 / w_neg).mean()) / 0.5
            terms.append((policy * 5.0, ((v - ref) ** 2).mean()))
    expected = torch.stack([p for p, _ in terms]).mean() + 0.3 * torch.stack([k for _, k in terms]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_step_pulls_good_samples_closer_and_pushes_bad_ones_away():
    def nft(backbone) -> DiffusionNFT:
        objective = DiffusionNFT(ObjectiveConfig(name="nft", loss="nft", sample_steps=10, options={"kl_coef": 0.0}),
                                 backbone)
        objective.attach(backbone.denoiser)
        return objective

    before, after = errors_around_one_step(nft, advantage=5.0, lr=1e-4)
    assert after[0] < before[0] and after[1] > before[1]


@pytest.mark.slow
# NFT's EMA old policy, AWM's trailing anchor, DGPO's old policy, which samples round 1 here
@pytest.mark.parametrize("config, own", [("toy_nft.yaml", []), ("toy_awm.yaml", []),
                                         ("toy_dgpo.yaml", ["objective.options.old_samples_after=1"])])
def test_a_forward_process_method_resumes_exactly_with_its_shadow_weights(config, own, tmp_path):
    small = ["online.groups_per_round=2", "online.group_size=4", "online.steps_per_round=2", "objective.sample_steps=4",
             "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=2", "validation.every=0",
             "validation.prompt_file=null", *own]
    train(load_config(ROOT / "configs" / config, [f"output_dir={tmp_path / 'straight'}", *small]))
    train(load_config(ROOT / "configs" / config, [f"output_dir={tmp_path / 'split'}", *small, "train.max_steps=2"]))
    train(load_config(ROOT / "configs" / config, [f"output_dir={tmp_path / 'split'}", *small, "train.resume=latest"]))
    a = load_file(str(tmp_path / "straight/final/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split/final/pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [load_file(str(tmp_path / run / "rounds/round-00001/trajectories.safetensors")) for run in ("straight", "split")]
    assert torch.equal(rounds[0]["latents"], rounds[1]["latents"])  # round 1 sampled by the EMA old policy, resumed
