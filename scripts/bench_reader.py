"""How long the training loop waits for data: reading and decoding pairs, in the loop or read ahead.

Writes a parquet of JPEG pairs (photo-like: smooth gradients plus noise, ``--source-px``
square) and takes them in the trainer's order through :class:`diffalign.data.reader.ExampleReader`
at ``--resolution``, with ``--workers`` threads each. Between two takes the script waits
``--step-s`` seconds, standing in for the GPU's share of a step: with read-ahead threads the
decoding hides behind it, in the loop it adds to it. Prints a markdown table of the loop's
wait per pair.

    python scripts/bench_reader.py --pairs 48 --resolution 1024 --workers 0,1,2,4 --step-s 0.25
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def jpeg_pairs(path: Path, pairs: int, size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)

    def jpeg() -> bytes:
        colour = rng.uniform(0.2, 1.0, 3)
        pixels = ramp[None, :, None] * colour * 0.5 + ramp[:, None, None] * 0.5 + rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    table = {"caption": [f"pair {i}" for i in range(pairs)], "jpg_0": [jpeg() for _ in range(pairs)],
             "jpg_1": [jpeg() for _ in range(pairs)], "label_0": [1.0] * pairs}
    pq.write_table(pa.table(table), path)
    return path


def loop_wait(path: Path, resolution: int, workers: int, step_s: float, read_ahead: int) -> float:
    """Mean seconds per pair the loop spends waiting for its example (the step time excluded)."""
    from diffalign.data import DeterministicOrder, PairDataset
    from diffalign.data.reader import ExampleReader

    dataset = PairDataset(path, resolution=resolution)
    reader = ExampleReader(dataset, DeterministicOrder(len(dataset), seed=0), workers)
    waited = 0.0
    for position in range(len(dataset)):
        reader.prefetch(range(position, min(position + read_ahead, len(dataset))))
        started = time.perf_counter()
        reader.take(position)
        waited += time.perf_counter() - started
        time.sleep(step_s)  # the GPU's share of the step, during which the threads read on
    reader.close()
    return waited / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--source-px", type=int, default=1024, help="side of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=1024, help="training resolution")
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--step-s", type=float, default=0.25, help="simulated GPU seconds per pair")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = jpeg_pairs(Path(folder) / "pairs.parquet", args.pairs, args.source_px)
        print(f"\n{args.pairs} pairs of {args.source_px} px JPEGs at {args.resolution} px, "
              f"{args.step_s} s of simulated GPU work per pair\n")
        print("| data.workers | loop waits per pair, s | share of the step spent waiting |")
        print("|---|---|---|")
        for workers in (int(w) for w in args.workers.split(",")):
            wait = loop_wait(path, args.resolution, workers, args.step_s, read_ahead=2 * max(1, workers))
            print(f"| {workers} | {wait:.3f} | {wait / (wait + args.step_s):.0%} |")


if __name__ == "__main__":
    main()
