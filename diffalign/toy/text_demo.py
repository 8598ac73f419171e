"""``diffalign demo --lm``: DPO on a causal language model end to end, on a CPU, in a minute or two.

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
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.errors import UserError
from diffalign.eval.report import line_plot, markdown_table
from diffalign.eval.text import evaluate_language_models, write_text_report
from diffalign.lm.loading import load_trained_lm
from diffalign.lm.sampling import sample_completions
from diffalign.paths import CONFIGS
from diffalign.rewards.text import load_text_reward
from diffalign.toy.demo import align
from diffalign.toy.text_model import TOY_LM
from diffalign.toy.text_world import preference_score, prompts as toy_prompts

EVAL_SEED = 10**6
MAX_NEW_TOKENS = 12  # a sentence is 9 words and the EOS


def write_text_pairs(prompts: Sequence[str], completions: Sequence[str], candidates: int, out: Path) -> Path:
    """Best-vs-worst completion of each group of ``candidates`` (groups with no spread dropped) as a
    prompt/chosen/rejected parquet file, written whole or not at all."""
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "score_chosen": [], "score_rejected": []}
    for start in range(0, len(completions), candidates):
        group = list(completions[start:start + candidates])
        scores = [preference_score(c) for c in group]
        best = max(range(len(group)), key=scores.__getitem__)
        worst = min(range(len(group)), key=scores.__getitem__)
        if scores[best] == scores[worst]:
            continue
        for key, value in (("prompt", prompts[start]), ("chosen", group[best]), ("rejected", group[worst]),
                           ("score_chosen", scores[best]), ("score_rejected", scores[worst])):
            rows[key].append(value)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    pq.write_table(pa.table(rows), partial)
    os.replace(partial, out)
    return out


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
        model, tokenizer = load_trained_lm(TOY_LM)
        prompts = [p for p in toy_prompts("train") for _ in range(groups_per_prompt * candidates_per_group)]
        completions = sample_completions(model, tokenizer, prompts, seed=seed, max_new_tokens=MAX_NEW_TOKENS)
        write_text_pairs(prompts, completions, candidates_per_group, pairs)
    run_dir = out / "run"
    align(pairs, run_dir, config=config, overrides=[f"model.path={TOY_LM}", *overrides], resume=True)
    rewards = [load_text_reward("toy_text_preference"), load_text_reward("toy_text_judge")]
    evaluation = evaluate_language_models({"base": lambda: load_trained_lm(TOY_LM),
                                           "aligned": lambda: load_trained_lm(run_dir)},
                                          toy_prompts("heldout"), rewards, samples_per_prompt=eval_samples,
                                          seed=EVAL_SEED, max_new_tokens=MAX_NEW_TOKENS)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot = line_plot(out / "reward_margin.png",
                     {"chosen - rejected": ([h["step"] for h in history], [h["rewards/margins"] for h in history]),
                      "accuracy": ([h["step"] for h in history], [h["implicit_acc"] for h in history])},
                     xlabel="optimiser step", ylabel="implicit reward", title="DPO on the toy text world")
    summary = write_text_report(evaluation, out / "eval", title="diffalign demo --lm: DPO on the toy text world",
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
