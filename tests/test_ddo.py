"""DDO: the core loss by hand, the objective against hand computation on the toy model, self-play
reference refreshes, and the trainer wiring (resume included)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import images_parquet, toy_policy_and_reference
from safetensors.torch import load_file

from diffalign import losses
from diffalign.diffusion import group_scores, noised_group
from diffalign.objectives import DDO
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

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
                                    sample_steps=4, sample_guidance_scale=1.0), backbone)
    objective.steps_per_round = 2
    objective.attach(backbone.denoiser)
    return backbone, objective


def test_objective_scores_real_images_against_the_reference_s_samples_by_hand(toy):
    backbone, objective = toy
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(2, 2, 4, 16, 16, generator=g)  # each real image, then the sample for its caption
    randomness = objective.draw(2, (4, 16, 16), g)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    loss, metrics = objective(backbone, pairs, cond, randomness, backbone.denoiser, None)
    group = noised_group(pairs, cond, objective.schedule, timesteps=randomness["timesteps"], noise=randomness["noise"])
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


_TINY = ["objective.name=ddo", "objective.loss=ddo", "objective.sample_steps=3", "objective.sample_guidance_scale=1.0",
         "online.steps_per_round=3", "online.groups_per_round=4", "train.checkpoint_every=2"]


def _tiny(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs/tiny_sdxl_dpo.yaml", [f"data.path={data}", f"output_dir={out}", *_TINY,
                                                             *overrides])


@pytest.mark.slow
def test_trains_from_the_cli_on_tiny_sdxl_and_resumes_exactly_across_a_round(tmp_path):
    data = images_parquet(tmp_path / "images.parquet", n=6)
    from diffalign.cli import main

    straight = tmp_path / "straight"
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"data.path={data}", f"output_dir={straight}",
                 *_TINY, "train.max_steps=4"]) == 0
    summary = json.loads((straight / "metrics.json").read_text())
    assert math.isfinite(summary["last"]["loss"]) and summary["last"]["round"] == 1.0
    split = tmp_path / "split"
    train(_tiny(data, split, "train.max_steps=2"))
    train(_tiny(data, split, "train.max_steps=4", "train.resume=latest"))
    a = load_file(str(straight / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.testing.assert_close(load_file(str(straight / "rounds/round-00001/trajectories.safetensors")),
                               load_file(str(split / "rounds/round-00001/trajectories.safetensors")), rtol=0, atol=0)


def test_a_round_pairs_the_run_s_next_real_images_with_samples_for_their_captions(tmp_path):
    from diffalign.train.trainer import PreferenceTrainer

    data = images_parquet(tmp_path / "images.parquet", n=12)  # no image twice in the round
    trainer = PreferenceTrainer(_tiny(data, tmp_path / "run", "train.max_steps=4"))
    batch = trainer._micro_batch(3, 0)  # round 1: the run's positions 4 .. 7
    record = json.loads((tmp_path / "run/rounds/round-00001/groups.json").read_text())
    examples = [trainer.reader.take(p) for p in range(4, 8)]
    assert record["prompts"] == [e.caption for e in examples] and record["rewards"] is None
    recorded = load_file(str(tmp_path / "run/rounds/round-00001/trajectories.safetensors"))
    torch.testing.assert_close(recorded["real"], trainer._encode_images(examples).cpu())
    assert recorded["latents"].shape[1] == 1  # the samples alone, not their trajectories
    real, sample = batch["latents"][:, 0], batch["latents"][:, 1]
    for r, f in zip(real, sample):  # every unit is a real image of the round and the sample for its caption
        i = next(i for i, latent in enumerate(recorded["real"]) if torch.equal(latent, r))
        assert torch.equal(recorded["latents"][i, 0], f)


def test_ddo_configs_say_what_they_need(tmp_path):
    from diffalign.errors import UserError

    data = images_parquet(tmp_path / "images.parquet", n=6)
    with pytest.raises(UserError, match="needs no reward or label"):
        _tiny(data, tmp_path, "online.reward=toy_preference")
    with pytest.raises(UserError, match="is now online.steps_per_round"):
        _tiny(data, tmp_path, "objective.refresh_every=3")
    with pytest.raises(UserError, match="set data.path"):
        _tiny(data, tmp_path, "data.path=''")


@pytest.mark.slow
def test_two_processes_read_and_sample_a_round_as_one_process_does(tmp_path):
    """Each process reads the real images of its share of the round's groups and samples for their captions; the
    joined round is the one a single process makes (the real latents exactly, the samples up to the rounding of
    another batch size)."""
    import os
    import sys

    data = images_parquet(tmp_path / "images.parquet", n=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["-m", "diffalign", "train", str(ROOT / "configs/toy_ddo.yaml"), f"data.path={data}",
               "online.groups_per_round=4", "online.steps_per_round=2", "objective.sample_steps=3",
               "train.max_steps=1", "train.checkpoint_every=0"]
    launchers = {"one": [sys.executable, *command, "train.batch_size=2"],
                 "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command,
                         "train.batch_size=1"]}
    from fixtures import run_together

    for done in run_together({name: [*launch, f"output_dir={tmp_path / name}"] for name, launch in launchers.items()},
                             cwd=ROOT, env=env).values():
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (tmp_path / run / "rounds" / "round-00000" for run in ("one", "two"))
    a, b = (load_file(str(folder / "trajectories.safetensors")) for folder in (one, two))
    assert a.keys() == b.keys() and a["real"].shape[0] == 4
    torch.testing.assert_close(a["real"], b["real"], rtol=0, atol=0)
    torch.testing.assert_close(a["latents"], b["latents"], rtol=0, atol=1e-3)
    prompts = [json.loads((folder / "groups.json").read_text())["prompts"] for folder in (one, two)]
    assert prompts[0] == prompts[1] and len(set(prompts[0])) == 4
