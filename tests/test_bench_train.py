"""scripts/bench_train.py, where the speed tables of docs/benchmarks.md (and the pending GPU rows) come from: both
loops run, the example loop does exactly the extra encoding work it is said to do, and the table
compares each row with the example at the same settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffalign.diffusion import backbone_for, load_pipeline

ROOT = Path(__file__).resolve().parent.parent


def _encoding_flops(model: str, resolution: int) -> int:
    """FLOPs of what the example does beyond diffalign's cached step: VAE-encode a pair, text-encode its caption."""
    backbone = backbone_for(load_pipeline(ROOT / "assets/models" / model, random_init=True))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.encode_images(torch.zeros(2, 3, resolution, resolution))
        backbone.encode_prompts(["a photo of thing number 0"])
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-flux"])
def test_the_script_times_diffalign_against_the_example_loop(tmp_path, model):
    """On FLUX the example's loop noises as diffusers' flow scripts do; the work it adds is the same encoding."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--models", model,
                           "--batch", "1", "--resolution", "32", "--steps", "1", "--warmup", "1", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["impl"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"diffalign", "diffusers-example"}
    # the same denoiser work (policy forward and backward, reference forward) in both; the example adds the
    # encoders, every step, and diffalign's cached step nothing else
    extra = rows["diffusers-example"]["denoiser_flops"] - rows["diffalign"]["denoiser_flops"]
    assert extra == _encoding_flops(model, 32)
    assert all(row["pairs_per_s"] > 0 and row["mfu"] > 0 for row in rows.values())
    assert f"| {model} | lora | False | diffusers-example |" in done.stdout and " 1.00x |" in done.stdout
