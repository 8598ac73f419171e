"""scripts/bench_lm.py, where the LM speed table of docs/benchmarks.md comes from: both trainers run on the same model and data,
and the table prints a figure for each."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_lm_benchmark_runs_both_trainers(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts/bench_lm.py"), "--width", "64", "--layers", "1",
                           "--batch-size", "2", "--steps", "2", "--repeats", "1", "--lora", "4", "--uneven", "--packing"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = dict(re.findall(r"^\| (diffalign|TRL DPOTrainer|diffalign, data.packing=true) \| ([0-9.]+) \|$",
                           done.stdout, re.M))
    assert set(rows) == {"diffalign", "TRL DPOTrainer", "diffalign, data.packing=true"}
    assert all(float(v) > 0 for v in rows.values())
    assert "LoRA rank 4" in done.stdout and "uneven lengths" in done.stdout
