"""``diffalign demo --lm``: DPO-family alignment of a causal language model end to end, on a CPU, in about half a
minute on 2 cores.

1. Sample ``candidates`` completions per group from the shipped toy LM for the training prompts of the
   toy text world (:mod:`diffalign.toy.text_world`); the toy preference keeps the best and the worst of
   each group as a (chosen, rejected) pair, in TRL's prompt/chosen/rejected format.
2. Train DPO with the ordinary trainer and ``configs/toy_lm_dpo.yaml`` (DPO with an NLL term on the chosen
   completion, RPO: plain DPO displaces the words every sentence shares and breaks the grammar here).
3. Sample with the base and the aligned model on the held-out prompts, score both with the toy preference
   and the judge, and write metrics.json, a plot and an HTML report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from diffalign.errors import UserError
from diffalign.eval.report import line_plot, markdown_table
from diffalign.eval.text import evaluate_language_models, write_text_report
from diffalign.lm.loading import load_trained_lm
from diffalign.paths import CONFIGS
from diffalign.rewards.text import load_text_reward
from diffalign.demo.image import align
from diffalign.toy.text_model import TOY_LM
from diffalign.toy.text_data import MAX_NEW_TOKENS, sample_text_candidates, write_text_pairs
from diffalign.toy.text_world import prompts as toy_prompts

EVAL_SEED = 10**6


def run_text_demo(out: str | Path, *, config: str | Path = CONFIGS / "toy_lm_dpo.yaml", overrides: Sequence[str] = (),
                  groups_per_prompt: int = 64, candidates_per_group: int = 4, eval_samples: int = 64,
                  seed: int = 0) -> dict:
    """Run the LM demo into ``out``; returns the metrics written to ``out/metrics.json``. A demo stopped part-way
    continues when run again into the same ``out``; a finished one is never overwritten."""
    out = Path(out)
    if (out / "metrics.json").is_file():
        raise UserError(f"{out} holds a finished demo (its report: {out / 'report.html'}); choose another --out, "
                        "or delete that folder to run the demo again there")
    started = time.perf_counter()
    pairs = out / "data" / "pairs.parquet"
    if not pairs.is_file():
        write_text_pairs(sample_text_candidates(groups_per_prompt, candidates_per_group, seed), pairs)
    run_dir = out / "run"
    trained = align(pairs, run_dir, config=config, overrides=overrides, resume=True, model=TOY_LM)
    method = trained.objective.loss.upper()  # the loss the run trained (the shipped config's RPO: DPO + NLL)
    rewards = [load_text_reward("toy_text_preference"), load_text_reward("toy_text_judge")]
    evaluation = evaluate_language_models({"base": lambda: load_trained_lm(TOY_LM),
                                           "aligned": lambda: load_trained_lm(run_dir)},
                                          toy_prompts("heldout"), rewards, samples_per_prompt=eval_samples,
                                          seed=EVAL_SEED, max_new_tokens=MAX_NEW_TOKENS)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot = line_plot(out / "reward_margin.png",
                     {"chosen - rejected": ([h["step"] for h in history], [h["rewards/margins"] for h in history]),
                      "accuracy": ([h["step"] for h in history], [h["implicit_acc"] for h in history])},
                     xlabel="optimiser step", ylabel="implicit reward", title=f"{method} on the toy text world")
    summary = write_text_report(evaluation, out / "eval", title=f"diffalign demo --lm: {method} on the toy text world",
                                figures=[("The training pairs' implicit reward margin beta * (log-ratio of the chosen "
                                          "- that of the rejected) and the share of pairs it orders right, "
                                          "per logged step.", plot)])
    aligned, base = summary["aligned"], summary["base"]
    metrics = {"reward_base": base["toy_text_preference"], "reward_aligned": aligned["toy_text_preference"],
               "win_rate": aligned["toy_text_preference_win_rate"],
               "win_rate_95ci": [aligned["toy_text_preference_win_low"], aligned["toy_text_preference_win_high"]],
               "judge_base": base["toy_text_judge"], "judge_aligned": aligned["toy_text_judge"],
               "pairs": pq.read_metadata(pairs).num_rows, "eval_samples_per_model": len(evaluation.prompts),
               "seconds": time.perf_counter() - started}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copyfile(out / "eval" / "report.html", out / "report.html")
    print("\n" + markdown_table(summary, ["toy_text_preference", "toy_text_preference_win_rate", "toy_text_judge"]))
    print(f"\nwin rate {metrics['win_rate']:.3f} (95% CI {metrics['win_rate_95ci'][0]:.3f}-"
          f"{metrics['win_rate_95ci'][1]:.3f}); judge {metrics['judge_base']:.3f} -> {metrics['judge_aligned']:.3f}; "
          f"report: {out / 'report.html'}; {metrics['seconds']:.0f} s")
    return metrics
