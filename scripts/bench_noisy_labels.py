"""Noise-robust losses on the toy world with a known share of flipped labels: win rate against the base.

The toy pairs (best vs worst of each group of candidates from the shipped base, by the toy preference)
are written once; then, for each flip rate, a seeded random share of the pairs gets its label reversed
(the loser marked as the winner) and every loss trains Diffusion-DPO's toy config on the same flipped
pairs. cDPO and rDPO are given the true flip rate as their label smoothing (their best case: they need
it known); LCPO starts from a reliability of 0.9 and estimates it as it trains (its estimate at the end
is printed). ``ensemble`` is DPO on the pairs a reward ensemble does not dispute (``data.ensemble=filter``):
three synthetic reward models, each the toy preference score plus independent Gaussian noise of half the
standard deviation of the pairs' score gaps (the toy world has one reward model; real ensembles are
PickScore, HPS, ImageReward...). Each run is evaluated against the base on the held-out prompts at the
same seeds.

    python scripts/bench_noisy_labels.py                     # rates 0.2,0.4; dpo cdpo robust lcpo ensemble
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

from diffalign.data import PairDataset
from diffalign.diffusion import load_pipeline
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.toy.datasets import make_toy_datasets
from diffalign.demo.image import align_and_compare, headline

SMOOTHED = {"cdpo", "robust"}  # the losses that take the flip rate as their label_smoothing
ENSEMBLE_MODELS, ENSEMBLE_NOISE = 3, 0.5  # synthetic reward models; their noise, in score-gap standard deviations


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


def add_noisy_ensemble(path: Path, models: int = ENSEMBLE_MODELS, noise: float = ENSEMBLE_NOISE,
                       seed: int = 0) -> list[list[str]]:
    """Add ``models`` synthetic reward models' scores of both images (``rm{k}_0``, ``rm{k}_1``) to the table in
    place: the toy preference (``score_0/1``) plus Gaussian noise of ``noise`` times the standard deviation of
    the score gaps. Returns the column pairs, as ``data.ensemble_columns`` takes them."""
    table = pq.read_table(path)
    first, second = (table.column(c).to_pylist() for c in ("score_0", "score_1"))
    gaps = [a - b for a, b in zip(first, second)]
    mean = sum(gaps) / len(gaps)
    sd = noise * (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    draw = random.Random(seed)
    columns = []
    for k in range(models):
        for name, scores in ((f"rm{k}_0", first), (f"rm{k}_1", second)):
            table = table.append_column(name, [[x + draw.gauss(0.0, sd) for x in scores]])
        columns.append([f"rm{k}_0", f"rm{k}_1"])
    pq.write_table(table, path)
    return columns


def filter_accuracy(clean: Path, flipped: Path, ensemble: list[list[str]]) -> dict[str, int]:
    """How many pairs the ensemble filter drops, and how many of those had their label flipped."""
    was_flipped = [a != b for a, b in zip(*(pq.read_table(p).column("label_0").to_pylist() for p in (clean, flipped)))]
    kept = PairDataset(flipped, resolution=32, ensemble_columns=[tuple(c) for c in ensemble], ensemble="filter")
    kept_rows = {kept.read(p, decode=False).index for p in range(len(kept))}
    dropped = [i for i in range(len(was_flipped)) if i not in kept_rows]
    return {"dropped": len(dropped), "dropped_flipped": sum(was_flipped[i] for i in dropped),
            "flipped": sum(was_flipped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.2,0.4")
    parser.add_argument("--losses", default="dpo,cdpo,robust,lcpo,ensemble")
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
        ensemble = add_noisy_ensemble(data)
        for loss in args.losses.split(","):
            overrides = [f"objective.loss={loss}", *args.set]
            if loss == "ensemble":
                overrides = ["objective.loss=dpo", "data.ensemble=filter",
                             f"data.ensemble_columns={json.dumps(ensemble)}", *args.set]
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
                         "reliability": reliability, "seconds": time.perf_counter() - started,
                         **(filter_accuracy(folder / "pairs.parquet", data, ensemble) if loss == "ensemble" else {})})
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| flipped | loss | reward aligned | win rate [95% CI] | adherence change | LCPO reliability | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["win_rate_95ci"]
        reliability = "-" if r["reliability"] is None else f"{r['reliability']:.3f}"
        print(f"| {r['rate']:.0%} | {r['loss']} | {r['reward_aligned']:.3f} | {r['win_rate']:.3f} [{low:.2f}, "
              f"{high:.2f}] | {r['adherence_aligned'] - r['adherence_base']:+.3f} | {reliability} | "
              f"{r['seconds']:.0f} |")
    for r in rows:
        if "dropped" in r:
            print(f"ensemble filter at {r['rate']:.0%} flipped: dropped {r['dropped']} pairs, {r['dropped_flipped']} "
                  f"of them flipped ({r['flipped']} flipped in all)")


if __name__ == "__main__":
    main()
