"""Held-out reward against training time on the toy world: what the newer online methods claim (AWM up to 24x,
DGPO about 20x faster than Flow-GRPO) measured on 2 CPU cores.

Each method trains from its shipped ``configs/toy_<method>.yaml`` through the ``diffalign train`` command, with
validation every ``--every`` steps (the configs' own held-out prompts, images, seeds and guidance, so every method
is scored on the same images' prompts and seeds by the same reward, ``val_toy_preference``). The trainer logs each
validation with ``train_s``, its training time without the validations, so the curves compare training only. The
script prints a table (the held-out reward at step 0, the best reached and when, and the training time to first
reach each of a few fixed gains over step 0) and draws the curves into ``reward_time.png``.

    python scripts/bench_reward_time.py                              # Flow-GRPO, NFT, AWM, DGPO, DRaFT
    python scripts/bench_reward_time.py --objectives awm,dgpo --every 10
    python scripts/bench_reward_time.py --set train.max_steps=100   # a config override for every method
    python scripts/bench_reward_time.py --reuse                     # the table and plot of the runs in --out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from diffalign.paths import CONFIGS  # noqa: E402

REWARD = "val_toy_preference"


def train(method: str, out: Path, every: int, overrides: list[str], reuse: bool) -> list[dict[str, float]]:
    """Train ``method`` from its toy config into ``out/<method>``; its validation records, step 0 first. ``reuse``:
    a run already there (an earlier invocation's, whole or stopped part way) is read instead of trained again."""
    run = out / method
    if reuse and (run / "validation.jsonl").is_file():
        print(f"reusing {run}", flush=True)
        return [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    command = ["diffalign", "train", str(CONFIGS / f"toy_{method}.yaml"), f"output_dir={run}",
               f"validation.every={every}", "train.checkpoint_every=0", *overrides]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        sys.exit(f"{method}: diffalign train failed (its error is above); the runs before it are in {out}, and "
                 "--reuse reads them")
    return [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]


def first_time_reaching(records: list[dict[str, float]], level: float) -> float | None:
    """The training seconds at the first validation whose reward is at least ``level``; None when none is."""
    return next((r["train_s"] for r in records if r[REWARD] >= level), None)


def table(curves: dict[str, list[dict[str, float]]], gains: list[float]) -> str:
    """The markdown table of the module docstring."""
    head = ("| method | reward at step 0 | best reward (step, train s) | "
            + " | ".join(f"train s to +{g:g}" for g in gains) + " | steps/s |")
    lines = [head, "|" + "---|" * (4 + len(gains))]
    for method, records in curves.items():
        start, best = records[0], max(records, key=lambda r: r[REWARD])
        reached = [first_time_reaching(records, start[REWARD] + g) for g in gains]
        last = records[-1]
        lines.append(f"| {method} | {start[REWARD]:.3f} | {best[REWARD]:.3f} ({best['step']}, {best['train_s']:.0f}) | "
                     + " | ".join("not reached" if t is None else f"{t:.0f}" for t in reached)
                     + f" | {last['step'] / last['train_s']:.2f} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Held-out reward against training seconds, one line per method."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for method, records in curves.items():
        axes.plot([r["train_s"] for r in records], [r[REWARD] for r in records], marker="o", markersize=3,
                  label=method)
    axes.set_xlabel("training time (s, validations excluded)")
    axes.set_ylabel("held-out toy preference")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default="grpo,nft,awm,dgpo,draft")
    parser.add_argument("--every", type=int, default=20, help="validate every this many optimiser steps")
    parser.add_argument("--gains", default="0.05,0.1,0.2", help="reward gains over step 0 to time")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_reward_time"))
    parser.add_argument("--reuse", action="store_true", help="read the runs already in --out instead of training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every method's toy config (repeatable)")
    args = parser.parse_args()
    methods = args.objectives.split(",")
    missing = [m for m in methods if not (CONFIGS / f"toy_{m}.yaml").is_file()]
    if missing:
        sys.exit(f"no toy config for {', '.join(missing)} (configs/toy_<method>.yaml)")
    args.out.mkdir(parents=True, exist_ok=True)
    curves = {m: train(m, args.out, args.every, args.set, args.reuse) for m in methods}
    (args.out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
    plot(curves, args.out / "reward_time.png")
    print()
    print(table(curves, [float(g) for g in args.gains.split(",")]))
    print(f"\nplot: {args.out / 'reward_time.png'}")


if __name__ == "__main__":
    main()
