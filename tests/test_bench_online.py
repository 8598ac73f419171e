"""scripts/bench_online.py, where the online speed table of docs/benchmarks.md (and its pending GPU rows) come from: both
loops sample a round and train on it, the same (image, step) units per optimiser step, and the table compares
each row with Flow-GRPO's loop at the same settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
