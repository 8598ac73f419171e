"""Reruns and interrupts: Ctrl-C ends a run with exit status 130 after saving a checkpoint, and the same
command continues it; a finished demo is never overwritten; ``train.resume=latest`` says when there is
nothing to resume; eval names every model apart; a failed generate-ranked leaves no empty folder behind."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import pytest
from fixtures import pickapic_parquet

from diffalign.cli import main
from diffalign.demo import image as toy_demo
from diffalign.paths import CONFIGS, ROOT, TOY_BASE
from diffalign.train.trainer import PreferenceTrainer

QUICK = ["train.max_steps=4", "train.batch_size=2", "train.checkpoint_every=0", "train.log_every=1",
         "validation.every=0"]


@pytest.fixture
def ctrl_c_after_first_step(monkeypatch):
    """Press Ctrl-C (SIGINT to this process) once, as the first optimiser step ends; later runs in the same
    test go through."""
    original, pressed = PreferenceTrainer._optimizer_step, []

    def step(self, number):
        result = original(self, number)
        if not pressed:
            pressed.append(number)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(PreferenceTrainer, "_optimizer_step", step)
    return monkeypatch


def _steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_ends_training_with_130_and_the_same_command_with_resume_continues(ctrl_c_after_first_step, tmp_path,
                                                                                  capsys):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    command = ["train", str(CONFIGS / "tiny_sdxl_dpo.yaml"), f"data.path={data}", f"output_dir={tmp_path / 'run'}",
               f"model.path={ROOT / 'assets/models/tiny-sdxl'}", *QUICK]
    assert main(command) == 130
    assert "train.resume=latest" in capsys.readouterr().err
    assert _steps_logged(tmp_path / "run") == [1] and (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()
    assert main([*command, "train.resume=latest"]) == 0
    assert _steps_logged(tmp_path / "run") == [1, 2, 3, 4]


def test_resume_latest_refuses_a_missing_folder_and_says_when_it_starts_over(tmp_path, capsys):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    command = ["train", str(CONFIGS / "tiny_sdxl_dpo.yaml"), f"data.path={data}",
               f"model.path={ROOT / 'assets/models/tiny-sdxl'}", "train.resume=latest", *QUICK]
    assert main([*command, f"output_dir={tmp_path / 'typo'}"]) == 2
    assert "output_dir" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    assert main([*command, f"output_dir={tmp_path / 'empty'}"]) == 0
    assert f"train.resume=latest: {tmp_path / 'empty'} holds no checkpoint yet; starting at step 0" in \
        capsys.readouterr().out
    assert main([*command, f"output_dir={tmp_path / 'empty'}"]) == 2  # finished, with no checkpoint to continue
    assert "holds a finished run" in capsys.readouterr().err


def test_an_interrupted_demo_continues_and_a_finished_one_is_kept(ctrl_c_after_first_step, tmp_path, capsys):
    # the demo at a size a test affords (1 group of 2 per prompt, 2 sampler steps); the command is as shipped
    small = functools.partial(toy_demo.run_demo, groups_per_prompt=1, candidates_per_group=2, eval_seeds=1, steps=2)
    ctrl_c_after_first_step.setattr(toy_demo, "run_demo", small)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *QUICK]) == 130
    assert f"diffalign demo --out {out}" in capsys.readouterr().err
    assert _steps_logged(out / "run") == [1] and not (out / "metrics.json").exists()
    pairs = (out / "data" / "pairs.parquet").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), *QUICK]) == 0
    assert _steps_logged(out / "run") == [1, 2, 3, 4]  # continued, not started over
    assert (out / "data" / "pairs.parquet").stat().st_mtime_ns == pairs  # its pairs kept
    report = (out / "metrics.json").read_text()
    assert main(["demo", "--out", str(out), *QUICK]) == 2  # a finished demo: refused, untouched
    said = " ".join(capsys.readouterr().err.split())  # the error is wrapped at 100 columns, wherever the path ends
    assert "holds a finished demo" in said and (out / "metrics.json").read_text() == report


@pytest.mark.slow
def test_eval_names_two_runs_of_the_same_folder_name_apart(tmp_path):
    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    for demo in ("demo-1", "demo-2"):
        assert main(["train", str(CONFIGS / "toy_diffusion_dpo.yaml"), f"model.path={TOY_BASE}", f"data.path={data}",
                     f"output_dir={tmp_path / demo / 'run'}", "train.max_steps=1", "train.batch_size=2",
                     "validation.every=0"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(TOY_BASE), "--aligned", str(tmp_path / "demo-1/run"),
                 str(tmp_path / "demo-2/run"), "--prompts", "toy_heldout", "--seeds", "1", "--steps", "2",
                 "--out", str(out)]) == 0
    assert list(json.loads((out / "metrics.json").read_text())) == ["base", "demo-1/run", "demo-2/run"]
    assert main(["eval", "--base", str(TOY_BASE), "--aligned", f"a={tmp_path / 'demo-1/run'}",
                 f"a={tmp_path / 'demo-2/run'}", "--prompts", "toy_heldout", "--out", str(out)]) == 2


def test_eval_of_prompts_the_toy_judges_cannot_score_stops_before_generating(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "general", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--rewards is not given" in err and "pickscore:" in err and "Traceback" not in err and not out.exists()


def test_loading_a_run_says_nothing_diffusers_says_about_what_diffalign_does_on_purpose(tmp_path, caplog, recwarn):
    """A diffalign LoRA holds no text-encoder weights (diffusers says so for each encoder) and the dtype goes
    by torch_dtype, the keyword every supported diffusers takes (0.42 warns it is deprecated): neither is
    the user's business."""
    import logging
    import warnings

    import torch

    from diffalign.diffusion.finetuned import load_finetuned

    data = pickapic_parquet(tmp_path / "pairs.parquet", 4)
    assert main(["train", str(CONFIGS / "toy_diffusion_dpo.yaml"), f"model.path={TOY_BASE}", f"data.path={data}",
                 f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=2", "validation.every=0"]) == 0
    warnings.simplefilter("always")
    with caplog.at_level(logging.WARNING):
        load_finetuned(tmp_path / "run", torch_dtype=torch.float32)
    assert not [r for r in caplog.records if "No LoRA keys associated" in r.getMessage()]
    assert not [w for w in recwarn.list if "torch_dtype" in str(w.message)]
