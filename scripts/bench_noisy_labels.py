"""Noise-robust losses on the toy world with a known share of flipped labels: win rate against the base.

The toy pairs (best vs worst of each group of candidates from the shipped base, by the toy preference)
are written once; then, for each flip rate, a seeded random share of the pairs gets its label reversed
(the loser marked as the winner) and every loss trains Diffusion-DPO's toy config on the same flipped
pairs. cDPO and rDPO are given the true flip rate as their label smoothing (their best case: they need
it known); LCPO starts from a reliability of 0.9 and estimates it as it trains (its estimate at the end
is printed). Each run is evaluated against the base on the held-out prompts at the same seeds.

    python scripts/bench_noisy_labels.py                              # rates 0.2,0.4; dpo cdpo robust lcpo
    python scripts/bench_noisy_labels.py --rates 0.4 --losses dpo,lcpo
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from diffalign.diffusion import load_pipeline
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.toy.datasets import make_toy_datasets
from diffalign.toy.demo import align_and_compare, headline

SMOOTHED = {"cdpo", "robust"}  # the losses that take the flip rate as their label_smoothing


def flip_labels(pairs: Path, out: Path, rate: float, seed: int = 0) -> Path:
    """A copy of the pairs table with ``round(rate * rows)`` labels reversed, the rows drawn with ``seed``."""
    table = pq.read_table(pairs)
    flipped = set(random.Random(seed).sample(range(table.num_rows), round(rate * table.num_rows)))
    labels = table.column("label_0").to_pylist()
    labels = [1.0 - label if i in flipped else label for i, label in enumerate(labels)]
    index = table.schema.get_field_index("label_0")
    table = table.set_column(index, "label_0", pc.cast(labels, table.schema.field("label_0").type))
    pq.write_table(table, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.2,0.4")
    parser.add_argument("--losses", default="dpo,cdpo,robust,lcpo")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_noisy_labels"))
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run (repeatable)")
    args = parser.parse_args()
    base = load_pipeline(TOY_BASE)
    folder = make_toy_datasets(args.out / "data", groups_per_prompt=16, candidates=4, seed=0)
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        data = flip_labels(folder / "pairs.parquet", args.out / f"pairs_flipped_{rate:g}.parquet", rate)
        for loss in args.losses.split(","):
            overrides = [f"objective.loss={loss}", *args.set]
            if loss in SMOOTHED:
                overrides.append(f"objective.loss_options.label_smoothing={rate}")
            run = args.out / f"{loss}_{rate:g}"
            started = time.perf_counter()
            evaluation = align_and_compare(base, data, run, config=CONFIGS / "toy_diffusion_dpo.yaml",
                                           overrides=overrides, eval_seeds=args.eval_seeds, steps=20,
                                           guidance_scale=5.0)
            logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            reliability = next((x["reliability"] for x in reversed(logged) if "reliability" in x), None)
            rows.append({"rate": rate, "loss": loss, **headline(evaluation.summary()),
                         "reliability": reliability, "seconds": time.perf_counter() - started})
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| flipped | loss | reward aligned | win rate [95% CI] | adherence change | LCPO reliability | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["win_rate_95ci"]
        reliability = "-" if r["reliability"] is None else f"{r['reliability']:.3f}"
        print(f"| {r['rate']:.0%} | {r['loss']} | {r['reward_aligned']:.3f} | {r['win_rate']:.3f} [{low:.2f}, "
              f"{high:.2f}] | {r['adherence_aligned'] - r['adherence_base']:+.3f} | {reliability} | "
              f"{r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
