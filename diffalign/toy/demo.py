"""``diffalign demo``: preference alignment end to end on the toy world, on a CPU, in minutes.

1. Sample ``candidates`` images per group from the shipped base model for the training prompts;
   the toy preference keeps the best and the worst of each group as a (winner, loser) pair.
2. Train Diffusion-DPO with the ordinary trainer and ``configs/toy_diffusion_dpo.yaml``.
3. Generate with the base and the aligned model on the held-out prompts at the same seeds, score
   both with the toy preference and the adherence judge, and write the report.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Sequence

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.finetuned import is_finished_run, load_finetuned
from diffalign.diffusion.negative_guidance import with_negative_guidance
from diffalign.diffusion.sampling import generate
from diffalign.errors import Interrupted, UserError
from diffalign.eval import evaluate_models
from diffalign.eval.report import image_grid, line_plot, markdown_table, to_pil, write_evaluation_report
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.rewards import ToyAdherence, ToyPreference
from diffalign.toy.world import parse_caption, random_scene, render
from diffalign.toy.world import prompts as toy_prompts
from diffalign.train import Config, load_config, train

EVAL_SEED = 10**6


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Candidates:
    """``candidates`` images per group sampled from one model, with their toy-preference scores."""

    prompts: list[str]  # one per group
    images: torch.Tensor  # (G, K, 3, H, W) in [0, 1]
    scores: torch.Tensor  # (G, K)


def sample_candidates(pipe, prompts: Sequence[str], *, groups_per_prompt: int, candidates: int, seed: int,
                      steps: int, guidance_scale: float) -> Candidates:
    """Sample K images per group (``groups_per_prompt`` groups per prompt) and score them."""
    group_prompts = [p for p in prompts for _ in range(groups_per_prompt)]
    expanded = [p for p in group_prompts for _ in range(candidates)]
    seeds = [seed + i for i in range(len(expanded))]
    images = generate(pipe, expanded, seeds, steps=steps, guidance_scale=guidance_scale, progress=True)
    scores = ToyPreference()(images, expanded)
    return Candidates(group_prompts, images.view(len(group_prompts), candidates, *images.shape[1:]),
                      scores.view(len(group_prompts), candidates))


def write_pairs(candidates: Candidates, out: Path) -> Path:
    """Best-vs-worst pair of each group, as a Pick-a-Pic-style parquet file (groups with no spread dropped)."""
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "score_0": [], "score_1": []}
    for prompt, images, scores in zip(candidates.prompts, candidates.images, candidates.scores):
        best, worst = int(scores.argmax()), int(scores.argmin())
        if scores[best] == scores[worst]:
            continue
        rows["caption"].append(prompt)
        rows["jpg_0"].append(_png(images[best]))
        rows["jpg_1"].append(_png(images[worst]))
        rows["label_0"].append(1.0)
        rows["score_0"].append(float(scores[best]))
        rows["score_1"].append(float(scores[worst]))
    return write_table(rows, out)


def write_ranked(candidates: Candidates, out: Path) -> Path:
    """Every group as a ranked list (RankDPO's layout: images and one score per image)."""
    rows = {"caption": list(candidates.prompts),
            "images": [[_png(im) for im in images] for images in candidates.images],
            "scores": [scores.tolist() for scores in candidates.scores]}
    return write_table(rows, out)


def _image_rows(candidates: Candidates) -> dict[str, list]:
    """Every candidate as a captioned image row, group by group."""
    return {"caption": [p for p in candidates.prompts for _ in range(candidates.images.shape[1])],
            "image": [_png(im) for images in candidates.images for im in images]}


def write_images(candidates: Candidates, out: Path) -> Path:
    """Every candidate as a captioned image, without scores (Self-NPO's data: the model's own samples)."""
    return write_table(_image_rows(candidates), out)


def write_labelled_images(candidates: Candidates, out: Path) -> Path:
    """Every candidate with a binary label (Diffusion-KTO's data): liked when its toy-preference
    score is above the mean over all candidates, as a thumbs up / down that sees no other image."""
    liked = candidates.scores.flatten() > candidates.scores.mean()
    return write_table({**_image_rows(candidates), "label": liked.float().tolist()}, out)


def write_dissatisfied(candidates: Candidates, out: Path) -> Path:
    """The worst candidate of each group by the toy preference, as captioned images: the samples a user
    (here the reward) marked as dissatisfying, DRIFT's negatives."""
    rows: dict[str, list] = {"caption": [], "image": []}
    for prompt, images, scores in zip(candidates.prompts, candidates.images, candidates.scores):
        rows["caption"].append(prompt)
        rows["image"].append(_png(images[int(scores.argmin())]))
    return write_table(rows, out)


def write_world_images(prompts: Sequence[str], per_prompt: int, out: Path, seed: int = 0) -> Path:
    """Rendered scenes of the toy world itself (its "real data"), ``per_prompt`` per caption."""
    rng = random.Random(seed)
    rows: dict[str, list] = {"caption": [], "image": []}
    for prompt in prompts:
        colour, shape = parse_caption(prompt)
        for _ in range(per_prompt):
            image = torch.from_numpy(render(random_scene(rng, colour, shape))).permute(2, 0, 1).float() / 255
            rows["caption"].append(prompt)
            rows["image"].append(_png(image))
    return write_table(rows, out)


def write_table(rows: dict[str, list], out: Path) -> Path:
    """Write the table beside ``out`` and rename it into place: a stopped run leaves no half-written file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    pq.write_table(pa.table(rows), partial)
    os.replace(partial, out)
    return out


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
                           steps=steps, guidance_scale=guidance_scale)


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
