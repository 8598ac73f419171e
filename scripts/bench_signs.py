"""The sign world's OCR table: Flow-GRPO's visual-text-rendering result in miniature, scored by a real OCR model.

Each method trains from its ``configs/sign_<objective>.yaml`` on the 40 training words (Flow-GRPO and DiffusionNFT
sample and OCR-score their own rounds; Diffusion-DPO trains on ``sign:pairs``, the base's best- vs worst-spelled
images), then the base and the aligned model draw every held-out word (never in a training prompt) at the same
seeds, and PP-OCRv4 reads each image at its default detection size: OCR accuracy (Flow-GRPO's reward, 1 minus the
normalised edit distance) with its 95% interval, the paired difference (aligned minus base, image by image at the
same prompt and seed) with its 95% interval, the share spelled exactly, and the paired win rate with its Wilson
interval. ``--words heldout,train`` also measures on the training words (whether the run fit what it saw, apart from
whether it carried over). Training time is the run's wall clock on this machine.

    python scripts/bench_signs.py                            # grpo, nft, diffusion_dpo
    python scripts/bench_signs.py --objectives grpo --set train.max_steps=100
    python scripts/bench_signs.py --objectives diffusion_dpo --pair-groups 16 --eval-seeds 48 --set train.max_steps=1500
    python scripts/bench_signs.py --time-ocr                 # seconds to score 64 rendered signs, per detect_side
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.finetuned import load_finetuned
from diffalign.eval import evaluate_models
from diffalign.eval.stats import mean_interval
from diffalign.paths import CONFIGS, TOY_SIGN
from diffalign.rewards import load_reward
from diffalign.synth import sign_pairs
from diffalign.toy.sign_world import prompts, random_sign, render_sign
from diffalign.train import load_config, train

EVAL_SEED = 10**6  # far from every seed a round or the pairs sampled with
CONFIG_OF = {"grpo": "sign_grpo.yaml", "nft": "sign_nft.yaml", "diffusion_dpo": "sign_dpo.yaml"}


def time_ocr(count: int = 64) -> None:
    """Print how long the OCR reward takes to score ``count`` rendered signs, at each detection size."""
    rng = random.Random(0)
    signs = [random_sign(rng) for _ in range(count)]
    images = torch.from_numpy(np.stack([render_sign(s) for s in signs])).permute(0, 3, 1, 2).float() / 255
    for side in (736, 160):
        ocr = load_reward(f"ocr:detect_side={side}")
        ocr(images[:2], [s.caption for s in signs[:2]])  # the ONNX sessions' first call
        started = time.perf_counter()
        scores = ocr(images, [s.caption for s in signs])
        print(f"detect_side {side}: {count} images in {time.perf_counter() - started:.1f} s "
              f"({torch.get_num_threads()} threads), mean OCR accuracy {scores.mean():.3f}")


def measure(base, aligned, words: str, ocr, seeds: int) -> dict:
    """The base and the aligned model draw every word of ``words`` (a sign-world split) ``seeds`` times at the same
    seeds; PP-OCRv4 reads each image. Means with intervals, the paired difference, the exact-spelling shares."""
    evaluation = evaluate_models({"base": base, "aligned": aligned}, prompts(words), [ocr], seeds_per_prompt=seeds,
                                 seed=EVAL_SEED, steps=20, guidance_scale=5.0, progress=True)
    summary, scores = evaluation.summary(), evaluation.scores
    return {"base": summary["base"], "aligned": summary["aligned"],
            "difference": mean_interval(scores["aligned"]["ocr"] - scores["base"]["ocr"]),
            "exact": {model: float((scores[model]["ocr"] == 1).float().mean()) for model in ("base", "aligned")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", default=",".join(CONFIG_OF))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_signs"))
    parser.add_argument("--eval-seeds", type=int, default=16, help="images per word and model")
    parser.add_argument("--words", default="heldout",
                        help="the words measured: heldout (the 8 never trained on, the default), train (the 40 trained "
                             "on), or both: heldout,train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every objective's sign config (repeatable)")
    parser.add_argument("--pair-groups", type=int, default=sign_pairs.GROUPS_PER_PROMPT,
                        help="groups of candidates sampled per training word for sign:pairs, each giving at most one "
                             "pair (default: %(default)s)")
    parser.add_argument("--time-ocr", action="store_true", help="only time the OCR reward on rendered signs")
    args = parser.parse_args()
    if args.time_ocr:
        return time_ocr()
    sign_pairs.GROUPS_PER_PROMPT = args.pair_groups  # sign:pairs is cached per setting, so each gets its own
    ocr = load_reward("ocr")
    base = load_pipeline(TOY_SIGN)
    rows = {}
    for name in args.objectives.split(","):
        run = args.out / name
        config = load_config(CONFIGS / CONFIG_OF[name], [f"output_dir={run}", "validation.every=0", *args.set])
        started = time.perf_counter()
        train(config)
        seconds = time.perf_counter() - started
        for words in args.words.split(","):
            rows[name, words] = {**measure(base, load_finetuned(run), words, ocr, args.eval_seeds),
                                 "train_seconds": seconds, "steps": config.train.max_steps}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({f"{n} ({w})": r for (n, w), r in rows.items()}, indent=2) + "\n")
    print(f"\n{args.eval_seeds} seeds a word")
    print("| method | words | steps | OCR accuracy base [95% CI] | aligned [95% CI] | aligned - base, paired [95% CI] "
          "| spelled exactly, base -> aligned | win rate [95% CI] | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, words), r in rows.items():
        b, a, d = r["base"], r["aligned"], r["difference"]
        print(f"| {name} | {words} | {r['steps']} | {b['ocr']:.3f} [{b['ocr_low']:.3f}, {b['ocr_high']:.3f}] | "
              f"{a['ocr']:.3f} [{a['ocr_low']:.3f}, {a['ocr_high']:.3f}] | "
              f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {r['exact']['base']:.2f} -> {r['exact']['aligned']:.2f} | "
              f"{a['ocr_win_rate']:.3f} [{a['ocr_win_low']:.2f}, {a['ocr_win_high']:.2f}] | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
