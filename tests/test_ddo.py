"""DDO: the core loss by hand, the objective against hand computation on the toy model, self-play
reference refreshes, and the trainer wiring (resume included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import losses
from diffalign.diffusion import group_scores, noised_group
from diffalign.objectives import DDO
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig
from fixtures import images_parquet, toy_policy_and_reference

ROOT = Path(__file__).resolve().parent.parent


def test_ddo_loss_is_the_gan_discriminator_loss_of_the_likelihood_ratio_by_hand():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, 0.2], [-2.0, 0.1], [-1.5, 0.0], [-1.0, 0.3]))
    beta, alpha = 2.0, 0.5
    got = losses.get("ddo")(pc, pr, rc, rr, beta=beta, alpha=alpha)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for i in range(2):
        real, fake = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        expected = -math.log(sig(beta * real)) - alpha * math.log(1 - sig(beta * fake))
        assert got[i].item() == pytest.approx(expected, rel=1e-6)


def test_ddo_gradient_raises_the_ratio_on_data_and_lowers_it_on_samples():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    losses.get("ddo")(pc, pr, torch.zeros(3), torch.zeros(3), beta=1.0).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.fixture(scope="module")
def toy():
    backbone, reference_unet = toy_policy_and_reference()
    objective = DDO(ObjectiveConfig(name="ddo", loss="ddo", beta=500.0, loss_options={"alpha": 0.7},
                                    sample_steps=4, sample_guidance_scale=1.0, refresh_every=2), backbone)
    objective.attach(backbone.denoiser)
    return backbone, objective


def test_objective_scores_real_images_against_reference_samples_by_hand(toy):
    backbone, objective = toy
    g = torch.Generator().manual_seed(0)
    real = torch.randn(2, 1, 4, 16, 16, generator=g)
    randomness = {k: torch.cat([a, b]) for (k, a), b in zip(objective.draw(1, (4, 16, 16), g).items(),
                                                           objective.draw(1, (4, 16, 16), g).values())}
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    loss, metrics = objective(backbone, real, cond, randomness, backbone.denoiser, None)
    fake = objective.reference_samples(backbone, cond, randomness["sample_seed"], (4, 16, 16))
    # a sample depends on its own seed only, not on the batch it is drawn in
    torch.testing.assert_close(fake[1:], objective.reference_samples(backbone, cond[1:2], randomness["sample_seed"][1:],
                                                                    (4, 16, 16)))
    group = noised_group(torch.stack([real[:, 0], fake], 1), cond, objective.schedule,
                         timesteps=randomness["timesteps"], noise=randomness["noise"])
    s, ref = group_scores(backbone, group, reference=objective.reference_weights.denoiser())
    s = s.detach()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = sum(-math.log(sig(500 * float(s[b, 0] - ref[b, 0])))
                   - 0.7 * math.log(1 - sig(500 * float(s[b, 1] - ref[b, 1]))) for b in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert metrics["round"].item() == 0


def test_the_reference_is_the_round_start_policy_and_is_refreshed_each_round(toy):
    backbone, objective = toy
    unet = backbone.denoiser
    start = {n: t.clone() for n, t in objective.reference_weights.tensors.items()}
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    objective.after_optimizer_step()  # step 1 of a 2-step round: the reference stays
    assert all(torch.equal(start[n], t) for n, t in objective.reference_weights.tensors.items())
    objective.after_optimizer_step()  # round over: the reference becomes the policy
    live = dict(unet.named_parameters())
    assert all(torch.equal(live[n].detach(), t) for n, t in objective.reference_weights.tensors.items())
    state = objective.state_dict()
    assert state["optimizer_steps"] == 2 and set(state["reference"]) == set(objective.reference_weights.names)


def _tiny(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [
        f"data.path={data}", f"output_dir={out}", "objective.name=ddo", "objective.loss=ddo",
        "objective.sample_steps=3", "objective.sample_guidance_scale=1.0", "objective.refresh_every=3",
        "train.checkpoint_every=2", *overrides])


def test_trains_from_the_cli_on_tiny_sdxl_and_resumes_exactly_across_a_round(tmp_path):
    data = images_parquet(tmp_path / "images.parquet", n=6)
    from diffalign.cli import main

    straight = tmp_path / "straight"
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}", f"output_dir={straight}",
                 "objective.name=ddo", "objective.loss=ddo", "objective.sample_steps=3",
                 "objective.sample_guidance_scale=1.0", "objective.refresh_every=3", "train.checkpoint_every=2",
                 "train.max_steps=4"]) == 0
    summary = json.loads((straight / "metrics.json").read_text())
    assert math.isfinite(summary["last"]["loss"]) and summary["last"]["round"] == 1.0
    split = tmp_path / "split"
    train(_tiny(data, split, "train.max_steps=2"))
    train(_tiny(data, split, "train.max_steps=4", "train.resume=latest"))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
