"""scripts/bench_reward_time.py, where the reward-against-time table and plot of docs/toy-results.md come from: each
method trains from its toy config through ``diffalign train``, its validations logged with ``train_s``, and the
table times the first validation at each gain over step 0; ``--reuse`` reads the runs back without training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = [sys.executable, str(ROOT / "scripts" / "bench_reward_time.py")]
# what a CPU test cannot afford: 2 steps, rounds of 2 groups of 2 images of 2 sampler steps, one image per prompt
SMALL = ["train.max_steps=2", "online.groups_per_round=2", "online.group_size=2", "objective.sample_steps=2",
         "train.batch_size=2", "validation.images_per_prompt=1", "validation.steps=2", "validation.rewards=[toy_preference]"]


@pytest.mark.slow
def test_the_script_trains_each_method_and_tables_its_validations_against_training_time(tmp_path):
    args = [*SCRIPT, "--objectives", "dgpo", "--every", "1", "--out", str(tmp_path),
            *(f"--set={override}" for override in SMALL)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"dgpo"}  # one method: each is the same diffalign train from its toy config
    for records in curves.values():  # step 0, 1, 2; training time from 0, growing, validations left out
        assert [r["step"] for r in records] == [0, 1, 2]
        assert records[0]["train_s"] < records[1]["train_s"] < records[2]["train_s"]
    assert "| dgpo | " in done.stdout and "train s to +0.05" in done.stdout
    assert (tmp_path / "reward_time.png").stat().st_size > 0
    again = subprocess.run([*SCRIPT, "--objectives", "dgpo", "--reuse", "--out", str(tmp_path)], capture_output=True,
                           text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and f"reusing {tmp_path / 'dgpo'}" in again.stdout
    missing = subprocess.run([*SCRIPT, "--objectives", "nope", "--out", str(tmp_path)], capture_output=True, text=True,
                             cwd=ROOT, timeout=600)
    assert missing.returncode != 0 and "no toy config for nope" in missing.stderr
    failed = subprocess.run([*SCRIPT, "--objectives", "draft", "--out", str(tmp_path), "--set=train.max_steps=0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert failed.returncode != 0 and "draft: diffalign train failed" in failed.stderr
