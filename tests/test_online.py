"""Online D3PO: the objective's loss on recorded trajectory pairs, rounds sampled by the policy and
scored by a reward, exact resume across rounds, and the human-label stop-and-resume cycle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import toy_policy_and_reference
from safetensors.torch import load_file

from diffalign.diffusion.logprob import sample_trajectories, step_log_prob
from diffalign.errors import UserError
from diffalign.objectives import D3PO
from diffalign.objectives.d3po import d3po_step_loss
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


_SMALL = ["online.groups_per_round=4", "online.steps_per_round=2", "objective.sample_steps=4", "train.batch_size=2",
          "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "validation.every=0",
          "validation.prompt_file=null"]


def _config(out: Path, *extra: str):
    return load_config(ROOT / "configs/toy_d3po.yaml", [f"output_dir={out}", *_SMALL, *extra])


def test_d3po_objective_is_the_step_loss_on_the_winner_first_pairs():
    backbone, reference = toy_policy_and_reference()
    objective = D3PO(ObjectiveConfig(name="d3po", loss="dpo", beta=0.1, sample_steps=4, sample_eta=1.0,
                                     sample_guidance_scale=3.0), backbone)
    cond = backbone.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).repeat_interleave(2, dim=0)
    uncond = backbone.encode_prompts([""] * 4)
    traj = sample_trajectories(backbone, noise, cond.repeat_items(2), steps=4, eta=1.0, guidance_scale=3.0,
                               uncond=uncond, generator=torch.Generator().manual_seed(1))
    latents = traj.latents.view(2, 2, *traj.latents.shape[1:])
    steps = torch.tensor([1, 3])
    loss, metrics = objective(backbone, latents, cond, {"step": steps}, backbone.denoiser, reference)

    k = steps.repeat_interleave(2)
    score = lambda net: step_log_prob(backbone, traj.latents, k, cond.repeat_items(2), eta=1.0, guidance_scale=3.0,  # noqa: E731
                                      uncond=uncond, denoiser=net).view(2, 2)
    with torch.no_grad():
        logp, ref = score(backbone.denoiser), score(reference)
    expected = d3po_step_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=0.1, eps=0.1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (ref - logp).abs().max() > 0
    margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * (logp[:, 0] - ref[:, 0]).mean().item(), rel=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.1 * margin.mean().item(), rel=1e-5)
    assert metrics["implicit_acc"].item() == (margin > 0).float().mean().item()
    _, untrained = objective(backbone, latents, cond, {"step": steps}, backbone.denoiser, backbone.denoiser)
    assert untrained["implicit_acc"].item() == 0.5  # a tie counts one half, as in every pairwise objective


@pytest.mark.slow
def test_online_rounds_are_sampled_scored_and_resumed_exactly(tmp_path):
    straight = train(_config(tmp_path / "straight"))
    assert straight["steps"] == 4 and (tmp_path / "straight/rounds/round-00001/trajectories.safetensors").is_file()
    record = json.loads((tmp_path / "straight/rounds/round-00000/groups.json").read_text())
    assert len(record["prompts"]) == 4 and len(record["rewards"]) == 4
    assert len(list((tmp_path / "straight/rounds/round-00000/images").glob("*.png"))) == 8

    train(_config(tmp_path / "split", "train.max_steps=2"))
    assert not (tmp_path / "split/rounds/round-00001").exists()  # round 1 is sampled by the resumed run
    train(_config(tmp_path / "split", "train.resume=latest"))
    for name in ("straight", "split"):
        assert (tmp_path / name / "rounds/round-00001").is_dir()
    torch.testing.assert_close(load_file(str(tmp_path / "straight/rounds/round-00001/trajectories.safetensors")),
                               load_file(str(tmp_path / "split/rounds/round-00001/trajectories.safetensors")),
                               rtol=0, atol=0)
    a = load_file(str(tmp_path / "straight/final/pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split/final/pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_round_sampled_a_pair_at_a_time_is_the_round_sampled_at_once(tmp_path):
    """``online.sample_batch_size`` bounds the sampler's memory; since each pair has its own generator, the
    round it samples is the same (up to the rounding of another batch size; measured: equal). The VAE
    decodes one image at a time, and leaves its slicing as it found it."""
    from diffalign.diffusion import backbone_for, load_pipeline
    from diffalign.paths import TOY_BASE

    backbone = backbone_for(load_pipeline(TOY_BASE))
    decoded = []
    backbone.vae.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    assert backbone.decode_latents(torch.randn(3, 4, 4, 4)).shape[0] == 3
    assert decoded == [1, 1, 1] and not backbone.vae.use_slicing
    for name, size in (("at_once", 4), ("one_by_one", 1)):
        train(_config(tmp_path / name, "train.max_steps=1", f"online.sample_batch_size={size}"))
    a, b = (load_file(str(tmp_path / name / "rounds/round-00000/trajectories.safetensors"))
            for name in ("at_once", "one_by_one"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)
    at_once, one_by_one = (json.loads((tmp_path / name / "rounds/round-00000/groups.json").read_text())
                           for name in ("at_once", "one_by_one"))
    # the image statistics are read from 8-bit PNGs: latents equal to 1e-3 may round a pixel apart (a pixel of 16
    # 32x32 images moves a share by 6e-5), so they agree to that, the rest exactly
    stats = at_once.pop("image_stats"), one_by_one.pop("image_stats")
    # the ratio error re-scores each sampling batch's first trajectory: other batches, other rounding, both tiny
    assert max(at_once.pop("ratio_error"), one_by_one.pop("ratio_error")) < 1e-5
    assert at_once == one_by_one and stats[0].keys() == stats[1].keys()
    assert all(abs(stats[0][k] - stats[1][k]) < 1e-3 for k in stats[0])
    with pytest.raises(UserError, match="online.sample_batch_size must be >= 1"):
        _config(tmp_path / "bad", "online.sample_batch_size=0")


def test_human_labels_stop_the_run_until_a_person_has_labelled_the_round(tmp_path):
    labels = tmp_path / "labels.jsonl"
    run = tmp_path / "run"
    extra = ["online.reward=null", f"online.labels={labels}", "train.max_steps=2"]
    with pytest.raises(UserError, match=r"round 0 waits for 4 human labels.*train.resume=latest"):
        train(_config(run, *extra))
    assert (run / "checkpoints/step-0000000/trainer_state.json").is_file()
    waiting = [json.loads(line) for line in (run / "rounds/round-00000/to_label.jsonl").read_text().splitlines()]
    assert [w["pair"] for w in waiting] == [0, 1, 2, 3] and (run / "rounds/round-00000" / waiting[0]["images"][1]).is_file()
    labels.write_text("".join(json.dumps({"round": 0, "pair": i, "winner": i % 2}) + "\n" for i in range(4)))
    summary = train(_config(run, *extra, "train.resume=latest"))
    assert summary["steps"] == 2 and (run / "final/pytorch_lora_weights.safetensors").is_file()


def test_online_config_needs_one_source_of_preferences():
    with pytest.raises(UserError, match="exactly one source of preferences"):
        load_config(ROOT / "configs/toy_d3po.yaml", ["online.reward=null"])


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_d3po_trains_from_the_cli_on_tiny_sdxl_and_sd3(tmp_path, model):
    """SDXL samples with DDIM (eta 1), SD3 with the flow-matching SDE; both record and train end to end."""
    from diffalign.cli import main

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs/tiny_sdxl_dpo.yaml"), f"model.path={ROOT / 'assets/models' / model}",
                 "objective.name=d3po", "objective.loss=dpo", "objective.beta=0.1", "objective.sample_steps=3",
                 "objective.sample_guidance_scale=2.0", "online.prompts=toy_train", "online.groups_per_round=2",
                 "online.steps_per_round=2", "online.reward=toy_preference", "train.max_steps=2",
                 f"output_dir={run}"]) == 0
    assert (run / "rounds/round-00000/trajectories.safetensors").is_file()
    assert (run / "final/pytorch_lora_weights.safetensors").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


def test_t_range_restricts_the_trained_denoising_steps_to_those_noise_levels(tmp_path):
    from diffalign.train.trainer import PreferenceTrainer

    trainer = PreferenceTrainer(_config(tmp_path / "run", "objective.t_range=[0.5, 1.0]", "train.batch_size=32"))
    steps = trainer._micro_batch(0, 0)["randomness"]["step"]
    timesteps = load_file(str(tmp_path / "run/rounds/round-00000/trajectories.safetensors"))["timesteps"]
    assert (timesteps[steps] >= 500).all() and len(set(steps.tolist())) == int((timesteps >= 500).sum())
    with pytest.raises(UserError, match="keeps none"):
        PreferenceTrainer(_config(tmp_path / "none", "objective.t_range=[0.99, 1.0]"))._micro_batch(0, 0)
