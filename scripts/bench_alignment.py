"""Every objective on the toy world at equal compute: reward gain, win rate, adherence change, time.

One set of candidates is sampled from the shipped toy base model (K images per group for the
training prompts, scored by the toy preference); pair objectives train on each group's best vs
worst image, ranked-list objectives on the whole group; online objectives (d3po) sample their
own rounds from the policy and score them with the same toy preference; Diffusion-KTO trains on
every candidate with a binary label (liked when its score is above the mean). Self-NPO trains a
negative model on every candidate without scores; its row compares the base model guided by
that negative model (in place of the unconditional branch) with plain CFG. DDO trains on
rendered scenes of the toy world (its real data) against the policy's own samples; DRIFT pairs each group's
worst candidate (toy:dissatisfied) with the policy's fresh samples. The self-play loops (sppo, dno, gpo,
inpo_nash, rso) sample and score their own rounds as d3po does. Each objective trains from its
``configs/toy_<objective>.yaml`` (the same number of optimiser steps and of images through the
denoiser per step) and is evaluated against the base on the held-out prompts at the same seeds.

    python scripts/bench_alignment.py                       # every objective with a toy config
    python scripts/bench_alignment.py --objectives rank_dpo
    python scripts/bench_alignment.py --objectives d3po --set train.batch_size=16   # config overrides
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from diffalign.diffusion import load_pipeline
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.toy.datasets import is_toy_dataset, make_toy_datasets
from diffalign.demo.image import align_and_compare, headline


def data_for(name: str, folder: Path) -> Path | None:
    """The toy data an objective trains on: the table its toy config names (``toy:pairs`` ..., DDO's rendered
    scenes ``toy:world``, DRIFT's ``toy:dissatisfied``) as made in ``folder`` at this run's size; None for the
    online objectives that sample every image they train on."""
    path = (yaml.safe_load((CONFIGS / f"toy_{name}.yaml").read_text()).get("data") or {}).get("path")
    return folder / f"{path.removeprefix('toy:')}.parquet" if path and is_toy_dataset(path) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = [name for name, cls in OBJECTIVES.items()  # the image world's; the LM ones are in docs/language-models.md
                 if cls.family == "diffusion" and (CONFIGS / f"toy_{name}.yaml").is_file()]
    parser.add_argument("--objectives", default=",".join(available))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_alignment"))
    parser.add_argument("--groups-per-prompt", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every objective's toy config (repeatable)")
    args = parser.parse_args()
    base = load_pipeline(TOY_BASE)
    names = args.objectives.split(",")
    # the toy datasets the toy configs read (toy:pairs ...): at the default size, the very same tables
    folder = make_toy_datasets(args.out / "data", groups_per_prompt=args.groups_per_prompt,
                               candidates=args.candidates, seed=0)
    rows = {}
    for name in names:
        started = time.perf_counter()
        evaluation = align_and_compare(base, data_for(name, folder), args.out / name,
                                       config=CONFIGS / f"toy_{name}.yaml", overrides=args.set,
                                       eval_seeds=args.eval_seeds, steps=20, guidance_scale=5.0)
        rows[name] = {**headline(evaluation.summary()), "seconds": time.perf_counter() - started}
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| objective | reward base | reward aligned | gain | win rate [95% CI] | adherence change | train+eval s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        low, high = r["win_rate_95ci"]
        print(f"| {name} | {r['reward_base']:.3f} | {r['reward_aligned']:.3f} | "
              f"{r['reward_aligned'] - r['reward_base']:+.3f} | {r['win_rate']:.3f} [{low:.2f}, {high:.2f}] | "
              f"{r['adherence_aligned'] - r['adherence_base']:+.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
