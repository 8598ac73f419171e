"""The gold-reward watch of online runs: it stops a run whose held-out reward falls while its training reward
rises, says where gold was best, survives a resume, and refuses a gold reward the run trains on."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffalign.errors import UserError
from diffalign.train import load_config, train
from diffalign.train.gold import GoldWatch

ROOT = Path(__file__).resolve().parent.parent


def test_the_watch_stops_only_when_gold_falls_while_the_training_reward_rises():
    watch = GoldWatch("toy_adherence", patience=2)
    assert watch.observe(0, 0.80, None) is None
    assert watch.observe(10, 0.85, 0.10) is None  # both rise: learning
    assert watch.observe(20, 0.70, 0.20) is None  # gold falls once
    message = watch.observe(30, 0.60, 0.30)  # ... twice in a row while the training reward rises
    assert message is not None and "step 30" in message and "best (0.8500) at step 10" in message
    calm = GoldWatch("toy_adherence", patience=2)
    for step, gold, trained in ((0, 0.8, None), (10, 0.7, 0.2), (20, 0.6, 0.1), (30, 0.5, 0.0)):
        assert calm.observe(step, gold, trained) is None  # everything falls: no reward hacking, just a bad run
    restored = GoldWatch("toy_adherence", patience=2)
    restored.load(watch.state()[:3])
    assert restored.observe(30, 0.60, 0.30) == message


def test_a_run_the_watch_stops_ends_early_with_its_checkpoint_the_best_steps_weights_and_says_why(tmp_path,
                                                                                                  monkeypatch):
    golds, verdicts = iter([0.9, 0.5, 0.4]), iter([None, None, "stop: gold fell."])

    def observe(self, step, gold, trained):  # gold best at step 0, the base
        self.seen.append((step, next(golds), trained))
        return next(verdicts)

    monkeypatch.setattr(GoldWatch, "observe", observe)
    config = load_config(ROOT / "configs/toy_grpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "online.groups_per_round=2", "online.group_size=2",
        "online.steps_per_round=1", "objective.sample_steps=2", "train.batch_size=2", "train.max_steps=10",
        "train.checkpoint_every=0", "validation.every=1", "validation.steps=2", "validation.images_per_prompt=1",
        "validation.rewards=[toy_preference, toy_adherence]", "validation.gold=toy_adherence"])
    summary = train(config)
    assert summary["steps"] == 2 and not summary["interrupted"]
    assert summary["stopped_early"] == "stop: gold fell. The final weights are step 0's." and summary["final_from_step"] == 0
    assert (tmp_path / "run/checkpoints/step-0000002").is_dir() and (tmp_path / "run/final").is_dir()
    # the checkpoint holds step 2's trained LoRA; the final weights are step 0's, the base's (LoRA up-weights zero)
    final = load_file(str(tmp_path / "run/final/pytorch_lora_weights.safetensors"))
    ups = [v for k, v in final.items() if ".lora.up." in k or ".lora_B." in k]
    assert ups and all(v.abs().max() == 0 for v in ups)


def test_the_gold_reward_must_be_held_out_and_watched():
    base = ["validation.every=10", "validation.rewards=[toy_preference, toy_adherence]"]
    with pytest.raises(UserError, match="is the reward the run trains on"):
        load_config(ROOT / "configs/toy_grpo.yaml", [*base, "validation.gold=toy_preference"])
    with pytest.raises(UserError, match="must be one of validation.rewards"):
        load_config(ROOT / "configs/toy_grpo.yaml", [*base, "validation.gold=pickscore"])
    with pytest.raises(UserError, match="an online objective"):
        load_config(ROOT / "configs/toy_diffusion_dpo.yaml", [*base, "validation.gold=toy_adherence"])
