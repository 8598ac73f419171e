"""scripts/bench_online.py, where the online speed table of docs/benchmarks.md (and its pending GPU rows) come from: both
loops sample a round and train on it, the same (image, step) units per optimiser step, and the table compares
each row with Flow-GRPO's loop at the same settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import script_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_script_times_the_round_driver_against_flow_grpo_s_loop(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_online.py"), "--models", "tiny-sd3",
                           "--groups", "2", "--group-size", "2", "--sample-batch", "4", "--sample-steps", "2",
                           "--train-batch", "1", "--accumulation", "1", "--train-steps", "1", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"diffalign", "flow-grpo-loop"}
    assert {row["units_per_step"] for row in rows.values()} == {2}  # 1 trajectory x 2 steps x 1 accumulation
    assert all(row["images_per_s"] > 0 and row["steps_per_s"] > 0 for row in rows.values())
    assert "| tiny-sd3 | flow-grpo-loop |" in done.stdout and "1.00x, 1.00x |" in done.stdout


def test_the_flow_grpo_comparison_changes_two_lines_of_its_script_and_runs_diffalign_at_the_same_settings(tmp_path):
    """What --flow-grpo writes: a copy of train_sd3.py with exactly the two changed lines (refused when they are not
    there), a config in Flow-GRPO's format with the shared settings, and diffalign overrides that load as a config
    with the same round, steps, units and LoRA. (The comparison itself needs a checkout of yifan123/flow_grpo: run it
    by hand, docs/benchmarks.md.)"""
    import ast
    import argparse

    from diffalign.train import load_config

    bench = script_module("bench_online")
    checkout = tmp_path / "flow_grpo"
    (checkout / "scripts").mkdir(parents=True)
    script = ("import os\n\ndef sampler():\n        while True:\n            pass\n\ndef main(_):\n    epoch = 0\n"
              "    while True:\n        if epoch % config.eval_freq == 0:\n            eval()\n        epoch += 1\n")
    (checkout / "scripts" / "train_sd3.py").write_text(script)
    patched = bench.patched_train_script(checkout, tmp_path).read_text()
    assert patched.count('while epoch < int(os.environ["BENCH_EPOCHS"]):') == 1
    assert "        while True:\n" in patched  # the sampler's own loop is left alone
    assert "if epoch % config.eval_freq == 0 and epoch > 0:" in patched
    assert len(patched.splitlines()) == len(script.splitlines())
    (checkout / "scripts" / "train_sd3.py").write_text(script.replace("    while True:\n        if", "    for _ in x:\n        if"))
    with pytest.raises(SystemExit, match="while True"):
        bench.patched_train_script(checkout, tmp_path)
    args = argparse.Namespace(groups=4, group_size=4, sample_steps=10, steps_per_round=2, rounds=2, resolution=64,
                              precision="no", kl=0.0, sample_batch=None, processes=1)
    assert bench.flow_grpo_batch(args) == 8  # the round's 16 images over its 2 optimiser steps
    with pytest.raises(SystemExit, match="--sample-batch 16"):  # one batch cannot feed two optimiser steps
        bench.flow_grpo_batch(argparse.Namespace(**{**vars(args), "sample_batch": 16}))
    text = bench.flow_grpo_config(args, checkout, tmp_path / "weights", tmp_path / "prompts", tmp_path / "logs")
    ast.parse(text)
    lines = {line.strip() for line in text.splitlines()}
    for line in ("config.sample.num_batches_per_epoch = 2", "config.train.gradient_accumulation_steps = 1",
                 "config.sample.train_batch_size = config.sample.test_batch_size = 8", "config.train.batch_size = 8",
                 "config.sample.num_image_per_prompt = 4", 'config.reward_fn = {"jpeg_compressibility": 1.0}',
                 "config.sample.guidance_scale, config.sample.noise_level = 4.5, 0.7",
                 "config.train.learning_rate, config.train.clip_range, config.train.beta = 3e-4, 1e-4, 0.0",
                 "config.train.timestep_fraction, config.train.ema, config.train.cfg = 1.0, False, True"):
        assert line in lines, line
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "train.txt").write_text("a cat\na dog\n")
    config = load_config(ROOT / "configs" / "sd3_grpo.yaml",
                         bench.diffalign_overrides(args, ROOT / "assets/models/tiny-sd3", prompts, tmp_path / "run", 2))
    # Flow-GRPO's step: 1 batch of 8 images x 10 steps = 80 (image, step) units; diffalign's: 80 in one micro-batch
    assert (config.train.batch_size, config.train.gradient_accumulation) == (80, 1)
    assert config.online.sample_batch_size == 2  # groups of 4: Flow-GRPO's 8 images at once
    assert config.model.prompt_tokens == 128  # train_sd3.py's max_sequence_length
    # on two processes each samples and trains half: Flow-GRPO 4 images a batch, 2 batches a round, one a step
    two = argparse.Namespace(**{**vars(args), "processes": 2})
    lines = {line.strip() for line in bench.flow_grpo_config(two, checkout, tmp_path, tmp_path, tmp_path).splitlines()}
    assert {"config.sample.train_batch_size = config.sample.test_batch_size = 4",
            "config.sample.num_batches_per_epoch = 2", "config.train.gradient_accumulation_steps = 1"} <= lines
    config = load_config(ROOT / "configs" / "sd3_grpo.yaml",
                         bench.diffalign_overrides(two, ROOT / "assets/models/tiny-sd3", prompts, tmp_path / "run", 1))
    assert (config.train.batch_size, config.train.gradient_accumulation) == (40, 1)  # x 2 processes = 80 units
    assert (config.online.groups_per_round, config.online.group_size, config.online.steps_per_round) == (4, 4, 2)
    assert config.train.max_steps == 4 and config.objective.options.kl_coef == 0.0
    assert config.train.lora_rank == 32 and config.train.lora_alpha == 64 and config.objective.t_range == [0.0, 1.0]


def test_the_profile_sums_each_phase_from_the_functions_that_run_it(tmp_path):
    """--profile's reading of a cProfile file: a program that runs backward passes and AdamW steps shows seconds in
    those two phases and none in the others, and its total is the whole run's."""
    import cProfile

    import torch

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())

    def program() -> None:
        for _ in range(20):
            model(torch.randn(32, 64)).sum().backward()
            optimizer.step()

    profiler = cProfile.Profile()
    profiler.runcall(program)
    profile = tmp_path / "program.prof"
    profiler.dump_stats(str(profile))
    phases = script_module("bench_online").phase_seconds(profile)
    assert phases["backward"] > 0 and phases["optimiser step"] > 0
    assert phases["denoiser forward"] == phases["VAE decode"] == phases["text encoders"] == 0
    assert phases["denoiser forward calls"] == 0
    assert phases["total"] >= phases["backward"] + phases["optimiser step"]
