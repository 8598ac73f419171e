"""The image statistics that drift when a run games its reward (diffalign/eval/image_stats.py), by hand on images
whose values are known, and the drift watch: it stops a run whose validation images leave the base's limits and
ends it with the last step within them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.eval import image_stats
from diffalign.eval.image_stats import high_frequency_share, image_statistics
from diffalign.train import load_config, train
from diffalign.train.gold import DriftWatch

ROOT = Path(__file__).resolve().parent.parent


def _filled(r: float, g: float, b: float, side: int = 16) -> torch.Tensor:
    return torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, side, side).clone()


def test_each_statistic_by_hand():
    black, white, red, grey = _filled(0, 0, 0), _filled(1, 1, 1), _filled(1, 0, 0), _filled(0.5, 0.5, 0.5)
    half = torch.cat([black[..., :8], white[..., 8:]], dim=-1)  # left half black, right half white
    stats = image_statistics(torch.cat([black, white, red, grey, half]), ["a", "b", "c", "d", "e"])
    # luma: 0, 1, 0.299 (dark? no: >= 0.1), 0.5, half 0 and half 1 -> dark 1 + 0.5 of 5 images, bright 1 + 0.5
    assert stats["dark_share"] == pytest.approx(1.5 / 5) and stats["bright_share"] == pytest.approx(1.5 / 5)
    # saturation: black 0 (max 0), white 0, red 1, grey 0, half 0
    assert stats["saturation"] == pytest.approx(1 / 5)
    assert "diversity" not in stats  # no prompt has two images
    # a one-pixel checkerboard has all its power at (1/2, 1/2) cycles per pixel; a flat image none anywhere
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float().expand(1, 3, 64, 64)
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64)  # a slow gradient: power at low frequencies
    shares = high_frequency_share(torch.cat([checker, ramp]))
    assert shares[0].item() == pytest.approx(1.0) and shares[1].item() < 0.05


def test_diversity_is_the_rms_difference_of_a_prompts_images():
    a, b, c = _filled(0, 0, 0, 64), _filled(0.5, 0.5, 0.5, 64), _filled(1, 1, 1, 64)
    same = image_statistics(torch.cat([a, a, c, c]), ["x", "x", "y", "y"])
    assert same["diversity"] == pytest.approx(0.0)  # every seed of a prompt draws one image: collapse
    spread = image_statistics(torch.cat([a, b, c]), ["x", "x", "x"])
    assert spread["diversity"] == pytest.approx((0.5 + 1.0 + 0.5) / 3, rel=1e-5)


def test_the_drift_watch_stops_beyond_a_limit_and_names_the_last_step_within():
    watch = DriftWatch({"dark_share": 0.1, "diversity": 0.05})
    assert watch.observe(0, {"dark_share": 0.20, "diversity": 0.30, "saturation": 0.5}) is None  # the base
    assert watch.observe(10, {"dark_share": 0.28, "diversity": 0.27}) is None
    message = watch.observe(20, {"dark_share": 0.35, "diversity": 0.29})
    assert "dark_share 0.2000 -> 0.3500" in message and "diversity" not in message.split("limits:")[1].split(".")[0]
    assert watch.best_step == 10 and "step 10" in message
    restored = DriftWatch({"dark_share": 0.1, "diversity": 0.05})
    restored.load(watch.state()[:2])
    assert restored.observe(20, {"dark_share": 0.35, "diversity": 0.29}) == message


def test_drift_limits_are_checked_when_the_config_is_read():
    base = ["validation.every=10", "validation.prompt_file=toy_heldout"]
    with pytest.raises(UserError, match="the statistics are dark_share"):
        load_config(ROOT / "configs/toy_grpo.yaml", [*base, "validation.drift_limits={darkness: 0.1}"])
    with pytest.raises(UserError, match="must be a number > 0"):
        load_config(ROOT / "configs/toy_grpo.yaml", [*base, "validation.drift_limits={dark_share: 0}"])
    with pytest.raises(UserError, match="set validation.every >= 1"):
        load_config(ROOT / "configs/toy_grpo.yaml", ["validation.every=0", "validation.drift_limits={dark_share: 0.1}"])
    with pytest.raises(UserError, match="images_per_prompt >= 2"):
        load_config(ROOT / "configs/toy_grpo.yaml", [*base, "validation.images_per_prompt=1",
                                                      "validation.drift_limits={diversity: 0.1}"])


def test_a_run_whose_images_drift_stops_and_ends_with_the_last_step_within_the_limits(tmp_path, monkeypatch):
    """The images' statistics are the real ones but for dark_share, which the test moves: within the limit at steps
    0-2, beyond it at step 3. The run stops at 3 and ends with step 2's weights: those of the same run stopped at 2."""
    darkness = iter([0.20, 0.22, 0.25, 0.40])
    real = image_stats.image_statistics
    monkeypatch.setattr("diffalign.train.validation.image_statistics",
                        lambda images, prompts: {**real(images, prompts), "dark_share": next(darkness)})
    settings = ["data.path=toy:pairs", "train.batch_size=2", "train.max_steps=10", "train.checkpoint_every=0",
                "train.learning_rate=1e-3", "validation.every=1", "validation.steps=2", "validation.images_per_prompt=2",
                "validation.prompts=[a red circle]", "validation.prompt_file=null", "validation.rewards=[]"]
    summary = train(load_config(ROOT / "configs/toy_diffusion_dpo.yaml", [
        f"output_dir={tmp_path / 'drifted'}", *settings, "validation.drift_limits={dark_share: 0.1}"]))
    assert summary["steps"] == 3 and summary["final_from_step"] == 2
    assert "dark_share 0.2000 -> 0.4000" in summary["stopped_early"]
    assert summary["stopped_early"].endswith("The final weights are step 2's.")
    lines = (tmp_path / "drifted/validation.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all('"stat_high_frequency"' in line and '"stat_diversity"' in line for line in lines)
    assert (tmp_path / "drifted/checkpoints/step-0000003").is_dir()  # the stopped step's state, kept to look at
    two = train(load_config(ROOT / "configs/toy_diffusion_dpo.yaml", [
        f"output_dir={tmp_path / 'two'}", *settings, "train.max_steps=2", "validation.every=0"]))
    assert two["steps"] == 2
    ended = load_file(str(tmp_path / "drifted/final/pytorch_lora_weights.safetensors"))
    expected = load_file(str(tmp_path / "two/final/pytorch_lora_weights.safetensors"))
    assert ended.keys() == expected.keys() and all(torch.equal(ended[k], expected[k]) for k in ended)
