"""Nothing wrong ends as success: each probe of issue 40, reproduced as written there, now ends in a refusal before
any model loads, a skipped-and-said row, or a one-line error with a non-zero exit, and loses nothing the user had.

The runs are 2-4 steps of the tiny random-weight SDXL (``configs/tiny_sdxl_dpo.yaml``, overriding data.path,
model.path, output_dir, max_steps and checkpoint_every, which a CPU test must).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures import pickapic_parquet, png_bytes
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.data import PairDataset, RankedListDataset
from diffalign.data.order import DeterministicOrder
from diffalign.data.reader import ExampleReader
from diffalign.errors import UserError
from diffalign.paths import ROOT
from diffalign.train import load_config, train
from diffalign.train.run_folder import LOCK_FILE, RunLock
from diffalign.train.run_state import STATE_FILE
from diffalign.train.trainer import PreferenceTrainer

CONFIG = ROOT / "configs" / "tiny_sdxl_dpo.yaml"
TINY_SDXL = ROOT / "assets/models/tiny-sdxl"


def _config(data: Path, out: Path, *overrides: str):
    return load_config(CONFIG, [f"data.path={data}", f"output_dir={out}", f"model.path={TINY_SDXL}",
                                "train.checkpoint_every=0", "train.max_steps=2", *overrides])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return pickapic_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 4)


# --- settings refused before any model loads ----------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=inf", "train.learning_rate=inf: settings must be finite numbers"),
    ("train.learning_rate=.nan", "train.learning_rate=nan: settings must be finite numbers"),
    ("train.learning_rate=-1", r"train.learning_rate=-1.0 is out of range: it must be in \(0, 1\]"),
    ("train.learning_rate=5", r"train.learning_rate=5.0 is out of range: it must be in \(0, 1\]"),
    ("objective.beta=inf", "objective.beta=inf: settings must be finite numbers"),
    ("objective.beta=.nan", "objective.beta=nan: settings must be finite numbers"),
    ("objective.beta=-5", r"objective.beta=-5.0 is out of range: it must be in \(0, inf\)"),
    ("train.warmup_steps=-5", r"train.warmup_steps=-5 is out of range: it must be in \[0, inf\)"),
    ("train.max_grad_norm=-1", r"train.max_grad_norm=-1.0 is out of range"),
    ("data.resolution=33", "data.resolution=33 must be a multiple of 2 for tiny-sdxl .* try 32 or 34"),
    ("objective.loss_options={label_smoothing: .inf}", "objective.loss_options.label_smoothing=inf"),
    ("objective.t_range=[0.5, 0.2]", "objective.t_range=.* must be \\[lo, hi\\] with 0 <= lo < hi <= 1"),
])
def test_a_non_finite_or_out_of_range_setting_is_refused_naming_key_and_range(pairs, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        _config(pairs, tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


def test_the_resolution_multiple_is_the_real_models_vae_factor_times_its_patch(pairs, tmp_path):
    for model, bad, multiple in (("sdxl", 1020, 8), ("sd3-medium", 1000, 16), ("flux-dev", 1000, 16)):
        with pytest.raises(UserError, match=f"data.resolution={bad} must be a multiple of {multiple} for {model}"):
            _config(pairs, tmp_path / "run", f"model.path={ROOT / 'assets/models' / model}", f"data.resolution={bad}")
        _config(pairs, tmp_path / "run", f"model.path={ROOT / 'assets/models' / model}", "data.resolution=1024")


def test_the_cli_exits_2_with_one_line_for_a_bad_setting(pairs, tmp_path, capsys):
    assert main(["train", str(CONFIG), f"data.path={pairs}", "train.learning_rate=inf"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate=inf" in err and "Traceback" not in err


# --- a run that would end with wrong weights fails instead --------------------------------------------------
def _nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """The objective's loss becomes NaN at these optimiser steps (counted by calls: one micro-batch a step)."""
    original, calls = PreferenceTrainer._objective_loss, [0]

    def loss(self, batch):
        value, metrics = original(self, batch)
        calls[0] += 1
        return (value * math.nan if calls[0] - 1 in steps else value), metrics

    monkeypatch.setattr(PreferenceTrainer, "_objective_loss", loss)


def test_a_run_whose_every_step_was_skipped_fails_and_writes_no_final_weights(pairs, tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {0, 1})
    code = main(["train", str(CONFIG), f"data.path={pairs}", f"model.path={TINY_SDXL}", f"output_dir={tmp_path / 'r'}",
                 "train.max_steps=2", "train.checkpoint_every=0"])
    assert code == 2
    assert "every one of the run's 2 steps was skipped" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r" / "final").exists()


def test_inf_gradients_of_a_finite_loss_skip_the_step_and_the_weights_stay_finite(pairs, tmp_path, monkeypatch):
    original, calls = PreferenceTrainer._objective_loss, [0]

    def loss(self, batch):  # d/dx sqrt(x) at 0 is inf: a finite loss (+0) with NaN gradients, at the second step
        value, metrics = original(self, batch)
        calls[0] += 1
        if calls[0] == 2:
            value = value + 0.0 * torch.sqrt(self.params[0].sum() * 0.0)
        return value, metrics

    monkeypatch.setattr(PreferenceTrainer, "_objective_loss", loss)
    summary = train(_config(pairs, tmp_path / "r", "train.max_steps=3"))
    assert summary["bad_steps"] == 1
    weights = load_file(tmp_path / "r" / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_weights_are_never_saved_and_the_last_good_checkpoint_is_named(pairs, tmp_path, monkeypatch):
    original = PreferenceTrainer._optimizer_step

    def step(self, index):
        out = original(self, index)
        if index == 1:  # the update of the second step leaves a NaN in the weights
            with torch.no_grad():
                self.params[0].view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(PreferenceTrainer, "_optimizer_step", step)
    with pytest.raises(UserError, match=r"NaN or inf values, so checkpoint step-0000002 was not written.*"
                                        r"The last good checkpoint is .*step-0000001"):
        train(_config(pairs, tmp_path / "r", "train.max_steps=3", "train.checkpoint_every=1"))
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step-0000001"] and not (tmp_path / "r" / "final").exists()


def test_metrics_json_is_valid_json_after_a_nan_step(pairs, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    train(_config(pairs, tmp_path / "r", "train.max_steps=3", "train.log_every=1"))

    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    summary = json.loads((tmp_path / "r" / "metrics.json").read_text(), parse_constant=refuse)
    assert summary["last"]["loss"] is None and "last.loss" in summary["non_finite"]["keys"]
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


# --- bad rows: skipped and said, or named ---------------------------------------------------------------------
def _pairs_with_labels(path: Path, labels: list) -> Path:
    rows = {"caption": [f"picture {i}" for i in range(len(labels))],
            "jpg_0": [png_bytes((200, 60, 60), 32, i) for i in range(len(labels))],
            "jpg_1": [png_bytes((60, 60, 200), 32, 9 + i) for i in range(len(labels))], "label_0": labels}
    pq.write_table(pa.table(rows), path)
    return path


def test_labels_outside_0_1_are_bad_rows_and_bools_are_labels(tmp_path, capsys):
    data = _pairs_with_labels(tmp_path / "p.parquet", [1.0, 5.0, -1.0, 2.0, math.inf, 0.0, 0.25])
    dataset = PairDataset(data, resolution=16)
    assert list(dataset.indices) == [0, 5, 6] and dataset.skipped == {"label_0": 4}
    assert "row 1, column 'label_0': label must be a number in [0, 1]" in capsys.readouterr().err
    text = _pairs_with_labels(tmp_path / "t.parquet", ["1", "0", "yes"])
    with pytest.raises(UserError, match="has no usable pair"):
        PairDataset(text, resolution=16)
    assert "got '1'" in capsys.readouterr().err
    flags = _pairs_with_labels(tmp_path / "b.parquet", [True, False])
    assert PairDataset(flags, resolution=16).labels == [1.0, 0.0]
    with pytest.raises(UserError, match=r"bad data: .*row 1, column 'label_0': label must be"):
        PairDataset(data, resolution=16, on_error="raise")


def test_soft_dpo_with_out_of_range_labels_trains_finite_steps_on_the_rest(tmp_path):
    data = _pairs_with_labels(tmp_path / "p.parquet", [1.0, 5.0, -1.0, 0.0, 0.8, 0.3])
    summary = train(_config(data, tmp_path / "r", "objective.loss=soft_dpo", "data.ties=soft"))
    assert summary["bad_steps"] == 0 and summary["skipped_rows"] == {"label_0": 2}


def test_ranked_scores_that_are_not_numbers_are_bad_rows(tmp_path):
    rows = {"caption": ["a", "b"], "images": [[png_bytes((9, 9, 9))] * 2] * 2, "scores": [["x", "1"], ["1", "2"]]}
    pq.write_table(pa.table(rows), tmp_path / "r.parquet")
    with pytest.raises(UserError, match="no usable ranked list"):
        RankedListDataset(tmp_path / "r.parquet", resolution=16)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming ``width`` x ``height`` pixels (a decompression bomb's first bytes): a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_one_skipped_row_and_the_run_goes_on(tmp_path, capsys):
    data = pickapic_parquet(tmp_path / "p.parquet", 4)
    table = pq.read_table(data).to_pydict()
    table["jpg_1"][2] = _png_claiming(20000, 20000)  # past PIL's own refusal (twice its warning threshold)
    table["jpg_0"][3] = _png_claiming(12000, 12000)  # past diffalign's limit only
    pq.write_table(pa.table(table), data)
    summary = train(_config(data, tmp_path / "r", "train.max_steps=3"))
    assert summary["skipped_rows"] == {"jpg_1": 1, "jpg_0": 1}
    err = capsys.readouterr().err
    assert "row 2, column 'jpg_1': image too large: Image size (400000000 pixels) exceeds limit" in err
    assert "row 3, column 'jpg_0': image too large: 12000x12000 pixels, more than the limit of 89,478,485" in err
    with pytest.raises(UserError, match="no example of .* can be decoded.*image too large: 32x32 pixels"):
        train(_config(data, tmp_path / "small", "data.max_image_pixels=100"))


def _index(folder: Path, lines: list[str]) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes((200, 60, 60), 32, i))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def _row(i: int, first: str = "0.png") -> str:
    return json.dumps({"caption": f"picture {i}", "jpg_0": first, "jpg_1": "1.png", "label_0": 1.0})


def test_a_broken_jsonl_line_is_named_by_file_and_line(tmp_path, capsys):
    index = _index(tmp_path / "data", [_row(0), '{"caption": "cut sh', _row(2), "[1, 2]"])
    dataset = PairDataset(index, resolution=16)
    assert len(dataset) == 2 and dataset.skipped == {"(line)": 2}
    err = capsys.readouterr().err
    assert f"skipped a bad row: {index}, line 2: not valid JSON" in err
    assert f"{index}, line 4: a JSON list, not an object of columns" in err
    with pytest.raises(UserError, match=f"bad data: {index}, line 2: not valid JSON"):
        PairDataset(index, resolution=16, on_error="raise")


def test_an_empty_table_is_one_line(tmp_path):
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    pq.write_table(schema.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(UserError, match="holds no rows"):
        PairDataset(tmp_path / "empty.parquet", resolution=16)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no rows"):
        PairDataset(tmp_path / "e.jsonl", resolution=16)


def test_the_reader_finds_the_one_good_row_within_each_epochs_order(tmp_path):
    index = _index(tmp_path / "data", [_row(0, "missing.png"), _row(1), _row(2, "missing.png")])
    dataset = PairDataset(index, resolution=16)
    for seed in range(6):
        reader = ExampleReader(dataset, DeterministicOrder(len(dataset), seed), workers=0)
        assert [reader.take(p).index for p in range(9)] == [1] * 9


def test_a_jsonl_of_three_rows_with_two_undecodable_trains(tmp_path):
    index = _index(tmp_path / "data", [_row(0, "missing.png"), _row(1), _row(2, "missing.png")])
    summary = train(_config(index, tmp_path / "r", "train.max_steps=2", "train.batch_size=2"))
    assert summary["steps"] == 2 and summary["skipped_rows"] == {"jpg_0": 2}


# --- the disk -------------------------------------------------------------------------------------------------
def test_a_disk_that_fills_while_a_checkpoint_is_written_is_one_line_and_leaves_nothing_half_written(
        pairs, tmp_path, monkeypatch):
    from accelerate import Accelerator

    original, calls = Accelerator.save_state, [0]

    def save_state(self, folder, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # what torch.save says when the disk is full
            Path(folder, "optimizer.bin").write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return original(self, folder, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(UserError, match=r"cannot write checkpoint step-0000002 into .*checkpoints \(RuntimeError.*"
                                        r"it needs about .* GiB and the disk has .* GiB free\. Nothing half-written was "
                                        r"kept\. The last complete checkpoint is .*step-0000001"):
        train(_config(pairs, tmp_path / "r", "train.max_steps=3", "train.checkpoint_every=1"))
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-0000001"]


def test_a_half_written_checkpoint_left_by_a_killed_run_is_removed_on_the_next_start(pairs, tmp_path, capsys):
    train(_config(pairs, tmp_path / "r", "train.max_steps=2", "train.checkpoint_every=1"))
    leftover = tmp_path / "r" / "checkpoints" / "step-0000009.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    train(_config(pairs, tmp_path / "r", "train.resume=latest", "train.max_steps=3"))
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().err


def test_a_read_only_output_folder_is_one_line(pairs, tmp_path, monkeypatch):
    import errno

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(UserError, match=r"cannot write the run's folder into .* \(the file system is read-only\)"):
        train(_config(pairs, tmp_path / "r"))


# --- checkpoints read no pickle -------------------------------------------------------------------------------
class _Planted:
    """Unpickling this writes a file: what a planted pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_checkpoint_keeps_its_ema_as_safetensors_and_refuses_a_planted_pickle(pairs, tmp_path):
    run = tmp_path / "r"
    train(_config(pairs, run, "train.max_steps=2", "train.checkpoint_every=1", "train.ema_decay=0.9"))
    checkpoint = run / "checkpoints" / "step-0000002"
    assert (checkpoint / STATE_FILE).is_file()
    assert [p.name for p in checkpoint.glob("*.pkl")] == ["random_states_0.pkl"]  # read with weights_only=True
    import shutil

    shutil.rmtree(run / "final")
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(UserError, match="holds custom_checkpoint_0.pkl, which diffalign never writes"):
        train(_config(pairs, run, "train.max_steps=3", "train.ema_decay=0.9", "train.resume=latest"))
    assert not marker.exists()


# --- one run per folder ---------------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(pairs, tmp_path):
    out = tmp_path / "r"
    with RunLock(out):  # the first run, still going
        with pytest.raises(UserError, match=f"another run \\(PID {os.getpid()}\\) is writing to {out}"):
            train(_config(pairs, out, "train.seed=1"))
    assert not (out / "config.yaml").exists()
    train(_config(pairs, out))  # released when the first ends


def test_a_lock_file_left_by_a_dead_process_is_no_lock(pairs, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999")  # a crashed run's file: no process holds its lock
    assert train(_config(pairs, out))["steps"] == 2


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused_and_the_other_finishes(pairs, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r"
    args = [sys.executable, "-m", "diffalign", "train", str(CONFIG), f"data.path={pairs}", f"model.path={TINY_SDXL}",
            f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=0"]
    first = subprocess.Popen([*args, "train.seed=0"], stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen([*args, "train.seed=1"], stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] == 2, results
    refused = next(err for code, err in results if code == 2)
    assert "is writing to" in refused or "already holds a run" in refused
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one run's log, not two mixed
