"""The data path at scale: cache writes, table memory, and how long the loop waits for images.

- ``cache``: milliseconds per ``TensorCache.put_many`` of one small entry as the cache grows
  (``--puts``), and the files it leaves; the cost of the index shows.
- ``rows``: a parquet of ``--pairs`` pairs of random ``--blob-kib`` KiB "images"; the private
  (anonymous) memory a process gains by opening it with ``RowSource`` and reading 200 random
  rows, and the time per row.
- ``reader``: a parquet of JPEG pairs (photo-like, ``--source-px`` square) taken in the trainer's
  order through ``ExampleReader`` at ``--resolution`` with ``--workers`` threads each; between
  two takes the script waits ``--step-s`` seconds, standing in for the GPU's share of a step.
  With read-ahead threads the decoding hides behind it; in the loop it adds to it.
- ``labels``: ``diffalign pairs-to-labels``, with and without ``--verify``, on a parquet of ``--pairs``
  JPEG pairs (``--source-px``):
  seconds for the one-time parquet-to-Arrow conversion and for the conversion itself, and MB/s.

To compare with an earlier version, run it with that version first on the path:
``git worktree add /tmp/old COMMIT && PYTHONPATH=/tmp/old python scripts/bench_data.py cache``.

    python scripts/bench_data.py cache --puts 1000,2000,4000,100000
    python scripts/bench_data.py rows --pairs 2000 --blob-kib 256
    python scripts/bench_data.py reader --pairs 32 --resolution 1024 --workers 0,1,2,4 --step-s 0.25
    python scripts/bench_data.py labels --pairs 1000 --source-px 512
"""

from __future__ import annotations

import argparse
import io
import os
import random
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


def bench_cache(puts: list[int]) -> None:
    import torch

    from diffalign.diffusion import TensorCache

    print("| puts | ms per put | files left |\n|---|---|---|")
    for n in puts:
        with tempfile.TemporaryDirectory() as folder:
            cache = TensorCache(folder)
            started = time.perf_counter()
            for i in range(n):
                cache.put_many({f"{i:040d}": {"latents": torch.zeros(4, 16, 16)}})
            getattr(cache, "flush", lambda: None)()  # versions before buffering had no flush
            seconds = time.perf_counter() - started
            print(f"| {n} | {seconds / n * 1e3:.2f} | {len(os.listdir(folder))} |")


def anonymous_rss_mib() -> float:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
    return int(fields["RssAnon"].split()[0]) / 1024


def _write_random_pairs(path: Path, pairs: int, blob_kib: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [os.urandom(blob_kib * 1024) for _ in range(pairs)]
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(pairs)], "jpg_0": blobs, "jpg_1": blobs,
                             "label_0": [1.0] * pairs}), path, row_group_size=100)


def _open_and_read(path: Path, results) -> None:
    from diffalign.data import RowSource

    import datasets  # noqa: F401  (imported before the baseline: its import is not the table's memory)

    before, started = anonymous_rss_mib(), time.perf_counter()
    source = RowSource(path)
    opened = time.perf_counter() - started
    rng, started = random.Random(0), time.perf_counter()
    for _ in range(200):
        source.row(rng.randrange(len(source)))
    results.put((opened, anonymous_rss_mib() - before, (time.perf_counter() - started) / 200))


def bench_rows(pairs: int, blob_kib: int) -> None:
    """Each step in a fresh process, so no memory freed by an earlier step is reused by a later one."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.parquet"
        writer = spawn.Process(target=_write_random_pairs, args=(path, pairs, blob_kib))
        writer.start()
        writer.join()
        results = spawn.Queue()
        for attempt in ("first open", "second open"):
            reader = spawn.Process(target=_open_and_read, args=(path, results))
            reader.start()
            opened, memory, per_row = results.get()
            reader.join()
            print(f"{attempt} of {path.stat().st_size / 2**20:.0f} MiB: {opened:.2f} s; private memory "
                  f"+{memory:.0f} MiB after 200 random rows; {per_row * 1e3:.2f} ms per row")


def bench_reader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = jpeg_pairs(Path(folder) / "pairs.parquet", args.pairs, args.source_px)
        print(f"\n{args.pairs} pairs of {args.source_px} px JPEGs at {args.resolution} px, "
              f"{args.step_s} s of simulated GPU work per pair\n")
        print("| data.workers | loop waits per pair, s | share of the step spent waiting |")
        print("|---|---|---|")
        for workers in (int(w) for w in args.workers.split(",")):
            wait = loop_wait(path, args.resolution, workers, args.step_s, read_ahead=2 * max(1, workers))
            print(f"| {workers} | {wait:.3f} | {wait / (wait + args.step_s):.0%} |")


def bench_labels(pairs: int, source_px: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        os.environ["HF_DATASETS_CACHE"] = str(Path(folder) / "hf_cache")  # cold, so the conversion is timed
        from diffalign.data import RowSource, pairs_to_labelled_images

        path = jpeg_pairs(Path(folder) / "pairs.parquet", pairs, source_px)
        megabytes = path.stat().st_size / 1e6
        start = time.perf_counter()
        RowSource(path)
        arrow = time.perf_counter() - start
        for verify in (False, True):
            start = time.perf_counter()
            summary = pairs_to_labelled_images(path, Path(folder) / f"labelled-{verify}", verify=verify)
            convert = time.perf_counter() - start
            print(f"{pairs} pairs of {source_px} px JPEGs ({megabytes:.0f} MB) -> {summary['images']} labelled images: "
                  f"parquet to Arrow {arrow:.1f} s (once per table); pairs-to-labels{' --verify' * verify} "
                  f"{convert:.1f} s, {megabytes / convert:.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("cache", "rows", "reader", "labels"))
    parser.add_argument("--puts", default="1000,2000,4000,100000", help="cache: entries written, per run")
    parser.add_argument("--pairs", type=int, default=None, help="rows: 2000; reader: 32; labels: 1000")
    parser.add_argument("--blob-kib", type=int, default=256, help="rows: size of each image cell")
    parser.add_argument("--source-px", type=int, default=1024, help="reader, labels: side of the stored JPEGs")
    parser.add_argument("--resolution", type=int, default=1024, help="reader: training resolution")
    parser.add_argument("--workers", default="0,1,2,4", help="reader: data.workers values")
    parser.add_argument("--step-s", type=float, default=0.25, help="reader: simulated GPU seconds per pair")
    args = parser.parse_args()
    if args.what == "cache":
        bench_cache([int(n) for n in args.puts.split(",")])
    elif args.what == "rows":
        bench_rows(args.pairs or 2000, args.blob_kib)
    elif args.what == "labels":
        bench_labels(args.pairs or 1000, args.source_px)
    else:
        args.pairs = args.pairs or 32
        bench_reader(args)


if __name__ == "__main__":
    main()
