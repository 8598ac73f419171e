"""``diffalign demo``: preference alignment end to end on the toy world, on a CPU, in minutes.

1. Sample ``candidates`` images per group from the shipped base model for the training prompts;
   the toy preference keeps the best and the worst of each group as a (winner, loser) pair.
2. Train Diffusion-DPO with the ordinary trainer and ``configs/toy_diffusion_dpo.yaml``.
3. Generate with the base and the aligned model on the held-out prompts at the same seeds, score
   both with the toy preference and the adherence judge, and write the report.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.finetuned import is_finished_run, load_finetuned
from diffalign.diffusion.negative_guidance import with_negative_guidance
from diffalign.errors import Interrupted, UserError
from diffalign.eval import evaluate_models
from diffalign.eval.report import image_grid, line_plot, markdown_table, write_evaluation_report
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.rewards import ToyAdherence, ToyPreference
from diffalign.toy.candidates import sample_candidates, write_pairs
from diffalign.toy.world import prompts as toy_prompts
from diffalign.train import Config, load_config, train

EVAL_SEED = 10**6


def align(data: Path | None, run_dir: Path, *, config: str | Path, overrides: Sequence[str] = (),
          resume: bool = False, model: Path = TOY_BASE) -> Config:
    """Train ``config`` on ``data`` (None for online objectives, which sample their own) from ``model`` (the toy base
    by default) into ``run_dir``; returns the config it trained. With ``resume`` (the demo) a run stopped part-way
    continues from its last checkpoint and a finished one is kept; otherwise (the benchmark) the folder,
    its own, starts over. Raises :class:`~diffalign.errors.Interrupted` when the run was stopped."""
    data_key = [] if data is None else [f"data.path={data}"]
    config = load_config(config, [f"model.path={model}", *data_key, f"output_dir={run_dir}", *overrides])
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    if resume and is_finished_run(run_dir):
        return config
    if not (resume and checkpoints):  # a run killed before its first checkpoint has nothing to continue
        shutil.rmtree(run_dir, ignore_errors=True)
    config.train.resume = "latest" if resume and checkpoints else None
    summary = train(config)
    if summary["interrupted"]:
        raise Interrupted(f"training stopped at step {summary['steps']} (checkpoint saved in {run_dir})",
                          summary["signal"] or signal.SIGINT)
    return config


def compare_with_base(base, run_dir: Path, config: Config, *, eval_seeds: int, steps: int, guidance_scale: float):
    """Generate with the base and the run's model on the held-out prompts at the same seeds and score both;
    returns the :class:`~diffalign.eval.Evaluation`."""
    aligned = load_finetuned(run_dir)
    if getattr(OBJECTIVES[config.objective.name], "negative_model", False):  # Self-NPO: base guided by it
        aligned = with_negative_guidance(load_pipeline(TOY_BASE), aligned.unet)
    # evaluation seeds start far from the sampling ones, so no evaluation noise was trained on
    return evaluate_models({"base": base, "aligned": aligned}, toy_prompts("heldout"),
                           [ToyPreference(), ToyAdherence()], seeds_per_prompt=eval_seeds, seed=EVAL_SEED,
                           steps=steps, guidance_scale=guidance_scale, progress=True)


def align_and_compare(base, data: Path | None, run_dir: Path, *, config: str | Path, overrides: Sequence[str] = (),
                      eval_seeds: int, steps: int, guidance_scale: float):
    """:func:`align` from scratch, then :func:`compare_with_base` (scripts/bench_alignment.py)."""
    trained = align(data, run_dir, config=config, overrides=overrides)
    return compare_with_base(base, run_dir, trained, eval_seeds=eval_seeds, steps=steps, guidance_scale=guidance_scale)


def headline(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """The demo's figures from an evaluation summary (base vs aligned)."""
    base, aligned = summary["base"], summary["aligned"]
    return {
        "reward_base": base["toy_preference"],
        "reward_aligned": aligned["toy_preference"],
        "win_rate": aligned["toy_preference_win_rate"],
        "win_rate_95ci": [aligned["toy_preference_win_low"], aligned["toy_preference_win_high"]],
        "adherence_base": base["toy_adherence"],
        "adherence_aligned": aligned["toy_adherence"],
    }


def run_demo(
    out: str | Path,
    *,
    config: str | Path = CONFIGS / "toy_diffusion_dpo.yaml",
    overrides: Sequence[str] = (),
    groups_per_prompt: int = 8,
    candidates_per_group: int = 4,
    eval_seeds: int = 16,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> dict:
    """Run the demo into ``out``; returns the metrics written to ``out/metrics.json``.

    A demo stopped part-way (Ctrl-C) continues when run again into the same ``out``: its pairs are kept,
    its training resumes from the last checkpoint. A finished demo is never overwritten.
    """
    out = Path(out)
    if (out / "metrics.json").is_file():
        raise UserError(f"{out} holds a finished demo (its report: {out / 'report.html'}); choose another --out, "
                        "or delete that folder to run the demo again there")
    started = time.perf_counter()
    base = load_pipeline(TOY_BASE)
    pairs = out / "data" / "pairs.parquet"
    if not pairs.is_file():  # written whole or not at all, so a pairs file from a stopped demo is complete
        candidates = sample_candidates(base, toy_prompts("train"), groups_per_prompt=groups_per_prompt,
                                       candidates=candidates_per_group, seed=seed, steps=steps,
                                       guidance_scale=guidance_scale)
        write_pairs(candidates, pairs)
    run_dir = out / "run"
    trained = align(pairs, run_dir, config=config, overrides=overrides, resume=True)
    evaluation = compare_with_base(base, run_dir, trained, eval_seeds=eval_seeds, steps=steps,
                                   guidance_scale=guidance_scale)
    # a picture for elsewhere (README): the first 24 held-out images of each model; the report shows them all
    image_grid({"base": evaluation.images["base"], "aligned": evaluation.images["aligned"]},
               columns=24).save(out / "grid.png")
    figures = []
    validation = run_dir / "validation.jsonl"
    if validation.is_file():
        points = [json.loads(line) for line in validation.read_text().splitlines()]
        plot = line_plot(out / "reward_over_steps.png",
                         {"held-out prompts": ([p["step"] for p in points], [p["val_toy_preference"] for p in points])},
                         xlabel="optimiser step", ylabel="mean toy reward", title="Toy reward during Diffusion-DPO")
        per_prompt = trained.validation.images_per_prompt
        figures.append((f"Mean toy reward of the validation samples during training. Step 0 is the base model. "
                        f"The validation set is {per_prompt} images per held-out prompt at seeds of its own, "
                        f"the table above {eval_seeds} per prompt at other seeds: two samples of the same "
                        "models, so the curve's step-0 value and the table's base value differ by sampling "
                        "noise (a picture of the wrong colour or shape costs 1).", plot))
    summary = write_evaluation_report(evaluation, out / "eval", title="diffalign demo: Diffusion-DPO on the toy world",
                                      figures=figures)
    metrics = {**headline(summary), "pairs": pq.read_metadata(pairs).num_rows,
               "eval_images_per_model": len(evaluation.prompts), "seconds": time.perf_counter() - started}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copyfile(out / "eval" / "report.html", out / "report.html")
    print("\n" + markdown_table(summary, ["toy_preference", "toy_preference_win_rate", "toy_adherence"]))
    print(f"\nwin rate {metrics['win_rate']:.3f} (95% CI {metrics['win_rate_95ci'][0]:.3f}-"
          f"{metrics['win_rate_95ci'][1]:.3f}); report: {out / 'report.html'}; {metrics['seconds']:.0f} s")
    return metrics
