"""``diffalign generate-ranked``: a synthetic ranked dataset the way RankDPO's Syn-Pic was built.

For every prompt, every generator makes K images (the same K seeds for all generators), every
reward model scores every image, and the per-prompt normalised scores are averaged
(:mod:`diffalign.rewards.ensemble`) into one score that ranks the list. The output folder is a
dataset that ``rank_dpo`` trains on directly (``data.path=OUTPUT_DIR``):

    images/p000000/<generator>-<seed>.png (a video generator's clip: .webp, animated, lossless)
    shard-00000.parquet    caption, images (paths), scores (ensemble), generators, seeds,
                           reward_<name> (every raw score), one row per prompt
    pairs.jsonl            Pick-a-Pic layout for pairwise objectives: caption, jpg_0, jpg_1,
                           label_0, score_0/1 and <reward>_0/1 (``data.score_columns`` for smpo)
    summary.json           per generator: mean ensemble score and mean rank

Resumable without duplicates or losses: images are written atomically and never regenerated;
a shard (a fixed block of prompts) is written atomically once all its images exist, so a
stopped run continues where it was. Generation is generator-major (each model is loaded once)
and reward models are loaded only after generation, so the two never share GPU memory.

Edits (``source_columns``): the prompts are a table of instructions with each row's source images, every
generator an edit model that edits them (its pipeline's own ``image`` argument), a reward that compares an edit
with its sources (``image_similarity``) gets them, and the dataset keeps each row's sources
(``images/p000000/source-<column>.png``) in the same columns, so it trains edits with
``data.source_columns`` as it is.

Launched on N processes (``accelerate launch`` or ``torchrun``, one per GPU), process r generates
every N-th missing image of each generator and scores every N-th shard, on its own GPU; the
output is the one a single process writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from diffalign.diffusion import process_state
from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.eval.saved import check_same_settings, load_png, save_png, saved_suffix
from diffalign.synth.config import GenerateConfig, GeneratorConfig
from diffalign.rewards import RewardSpec, ensemble, load_reward
from diffalign.rewards.video import score_media

Tensor = torch.Tensor


def _seeds(config: GenerateConfig, prompt_index: int) -> list[int]:
    k = config.seeds_per_generator
    return [config.seed + prompt_index * k + j for j in range(k)]


def _image_path(prompt_index: int, generator: str, seed: int, suffix: str = ".png") -> str:
    """Relative to the output folder (what the dataset stores); ``suffix`` .webp for clips (:func:`saved_suffix`)."""
    return f"images/p{prompt_index:06d}/{generator}-{seed}{suffix}"


def _source_path(prompt_index: int, column: str) -> str:
    return f"images/p{prompt_index:06d}/source-{column}.png"


def _read_prompts(config: GenerateConfig, out: Path, state: PartialState) -> list[str]:
    """The prompts; for edits the instructions, each row's sources written once under ``out`` (the main process)
    and read back from there, so generation and scoring see the same 8-bit images on every process and resume."""
    if not config.source_columns:
        return read_prompts(config.prompts)
    from diffalign.data.edit_prompts import EditPrompts

    edits = EditPrompts(config.prompts, resolution=config.source_resolution, caption_column=config.caption_column,
                        source_columns=config.source_columns)
    with state.main_process_first():
        if state.is_main_process:
            for i in range(len(edits.captions)):
                paths = [out / _source_path(i, column) for column in config.source_columns]
                if not all(path.is_file() for path in paths):
                    for path, pixels in zip(paths, edits.read(i).sources, strict=True):
                        save_png(pixels.add(1).div(2), path)
    return list(edits.captions)


def _sources(config: GenerateConfig, out: Path, indices) -> list[list[Image.Image]] | None:
    """The source images (PIL) of the prompts at ``indices``, as written under ``out``; None without edits."""
    if not config.source_columns:
        return None
    return [[Image.open(out / _source_path(i, column)).convert("RGB") for column in config.source_columns]
            for i in indices]


def _generate_missing(config: GenerateConfig, prompts: list[str], out: Path, state: PartialState) -> int:
    """This process's share of the images not on disk yet, of every generator; returns how many it generated."""
    from diffusers.training_utils import free_memory

    from diffalign.diffusion import default_device, resolve_dtype
    from diffalign.diffusion.finetuned import finetuned_loader
    from diffalign.diffusion.sampling import generate

    suffix = saved_suffix(bool(config.frames))
    todo = {g.name: [(i, s) for i in range(len(prompts)) for s in _seeds(config, i)
                     if not (out / _image_path(i, g.name, s, suffix)).is_file()][state.process_index::state.num_processes]
            for g in config.generators}
    total = sum(map(len, todo.values()))
    device = default_device()  # this process's GPU: PartialState made it the current one
    # every generator with work left is checked before the first one starts
    loaders = {g.name: finetuned_loader(g.path, base=g.base, torch_dtype=resolve_dtype(g.dtype, device),
                                        base_variant=g.variant, variant=g.variant)
               for g in config.generators if todo[g.name]}
    with tqdm(total=total, desc="generate", unit="img", disable=total == 0 or not state.is_local_main_process) as bar:
        for generator in config.generators:
            jobs = todo[generator.name]
            if not jobs:
                continue
            pipe = loaders[generator.name]().to(device)
            bar.set_postfix(generator=generator.name)
            for start in range(0, len(jobs), config.batch_size):
                batch = jobs[start:start + config.batch_size]
                images = generate(pipe, [prompts[i] for i, _ in batch], [s for _, s in batch], steps=generator.steps,
                                  guidance_scale=generator.guidance_scale, resolution=generator.resolution,
                                  width=generator.width, batch_size=config.batch_size,
                                  sources=_sources(config, out, [i for i, _ in batch]),
                                  frames=config.frames)
                for (i, s), image in zip(batch, images, strict=True):
                    save_png(image, out / _image_path(i, generator.name, s, suffix))
                bar.update(len(batch))
            del pipe
            free_memory()
    return total


def _score_shard(config: GenerateConfig, prompts: list[str], indices: range, out: Path, rewards: list) -> dict:
    """The rows of one shard: each prompt's list with raw and ensemble scores."""
    items = [(i, g.name, s) for i in indices for g in config.generators for s in _seeds(config, i)]
    paths = [_image_path(i, g, s, saved_suffix(bool(config.frames))) for i, g, s in items]
    captions = [prompts[i] for i, _, _ in items]
    per_batch: dict[str, list[Tensor]] = {r.name: [] for r in rewards}
    for start in range(0, len(items), config.batch_size):  # a batch of images in memory at a time, not a shard
        batch = slice(start, start + config.batch_size)
        images = torch.stack([load_png(out / p) for p in paths[batch]])
        sources = None if not config.source_columns else torch.stack([
            torch.stack([load_png(out / _source_path(i, column)) for column in config.source_columns])
            for i, _, _ in items[batch]])
        for reward in rewards:
            scores = reward(images, captions[batch], sources) if getattr(reward, "reads_sources", False) else \
                score_media(reward, images, captions[batch])
            per_batch[reward.name].append(scores.double())
    raw = {name: torch.cat(scores) for name, scores in per_batch.items()}
    groups = torch.tensor([i for i, _, _ in items])
    combined = ensemble(raw, groups, config.ensemble)
    per_prompt = len(config.generators) * config.seeds_per_generator
    rows: dict[str, list] = {"caption": [], "images": [], "scores": [], "generators": [], "seeds": [],
                             **{f"reward_{name}": [] for name in raw}, **{c: [] for c in config.source_columns}}
    for start in range(0, len(items), per_prompt):
        block = slice(start, start + per_prompt)
        rows["caption"].append(captions[start])
        rows["images"].append(paths[block])
        rows["scores"].append(combined[block].tolist())
        rows["generators"].append([g for _, g, _ in items[block]])
        rows["seeds"].append([s for _, _, s in items[block]])
        for column in config.source_columns:
            rows[column].append(_source_path(items[start][0], column))
        for name, values in raw.items():
            rows[f"reward_{name}"].append(values[block].tolist())
    return rows


def _write_parquet(rows: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), tmp)
    os.replace(tmp, path)


def _pairs(rows: list[dict], mode: str, source_columns: list[str]) -> list[dict]:
    """Pairwise rows from ranked rows: best vs worst, or every pair with different scores (an edit's with its
    sources)."""
    out = []
    reward_keys = [k for k in rows[0] if k.startswith("reward_")]
    for row in rows:
        order = sorted(range(len(row["scores"])), key=lambda j: -row["scores"][j])
        if mode == "best_worst":
            candidates = [(order[0], order[-1])]
        else:
            candidates = [(a, b) for n, a in enumerate(order) for b in order[n + 1:]]
        for a, b in candidates:
            if row["scores"][a] == row["scores"][b]:
                continue
            pair = {"caption": row["caption"], "jpg_0": row["images"][a], "jpg_1": row["images"][b], "label_0": 1.0,
                    "score_0": row["scores"][a], "score_1": row["scores"][b],
                    **{column: row[column] for column in source_columns}}
            for key in reward_keys:
                name = key.removeprefix("reward_")
                pair[f"{name}_0"], pair[f"{name}_1"] = row[key][a], row[key][b]
            out.append(pair)
    return out


def _summary(config: GenerateConfig, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per generator: mean ensemble score and mean rank within its prompt's list (1 = best)."""
    totals = {g.name: {"score": 0.0, "rank": 0.0, "images": 0} for g in config.generators}
    for row in rows:
        order = sorted(range(len(row["scores"])), key=lambda j: -row["scores"][j])
        for rank, j in enumerate(order, 1):
            t = totals[row["generators"][j]]
            t["score"] += row["scores"][j]
            t["rank"] += rank
            t["images"] += 1
    return {name: {"mean_score": t["score"] / t["images"], "mean_rank": t["rank"] / t["images"],
                   "images": t["images"]} for name, t in totals.items()}


def generate_ranked(config: GenerateConfig) -> dict:
    """Build (or resume) the dataset in ``config.output_dir``; returns the summary (also in summary.json).

    A run that fails before it made anything removes the output folder it created; one that made images or
    shards keeps them (the same command continues from them) and its error says where they are.
    """
    out = Path(config.output_dir)
    existed = out.exists()
    try:
        return _generate_ranked(config, out)
    except BaseException as err:
        made = [p for p in out.rglob("*") if p.is_file() and p.name != "generate_config.yaml"] if out.exists() else []
        if not existed and not made:
            if process_state().is_main_process:
                shutil.rmtree(out, ignore_errors=True)
        elif isinstance(err, UserError):
            raise UserError(f"{err} (What this run made is kept in {out}: {len(made)} files; run the same command "
                            "again to continue from them.)") from None
        raise


def _generate_ranked(config: GenerateConfig, out: Path) -> dict:
    state = process_state()  # one process, or those of accelerate launch / torchrun, each on its own GPU
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("batch_size", "output_dir", "pairs")
                and not (k == "frames" and not v)}  # a folder of images recorded no frames
    with state.main_process_first():  # the main process records the settings; the others then compare with them
        check_same_settings(out / "generate_config.yaml", identity, what="a dataset",
                            fix="use a new output_dir, or restore the settings to resume it")
    prompts = _read_prompts(config, out, state)
    generated = _generate_missing(config, prompts, out, state)
    state.wait_for_everyone()  # every image exists before any shard is scored
    shards = [range(s, min(s + config.shard_size, len(prompts))) for s in range(0, len(prompts), config.shard_size)]
    rewards = None
    mine = list(enumerate(shards))[state.process_index::state.num_processes]
    for number, indices in tqdm(mine, desc="score", unit="shard", disable=not state.is_local_main_process):
        path = out / f"shard-{number:05d}.parquet"
        if path.is_file():
            continue
        rewards = rewards or [load_reward(RewardSpec.parse(spec)) for spec in config.rewards]
        _write_parquet(_score_shard(config, prompts, indices, out, rewards), path)
    state.wait_for_everyone()
    rows = [r for number in range(len(shards)) for r in pq.read_table(out / f"shard-{number:05d}.parquet").to_pylist()]
    summary = {"prompts": len(rows), "images_generated_now": sum(gather_object([generated])),
               "generators": _summary(config, rows)}
    if state.is_main_process:
        if config.pairs != "none":
            tmp = out / "pairs.jsonl.tmp"
            tmp.write_text("".join(json.dumps(p) + "\n" for p in _pairs(rows, config.pairs, config.source_columns)))
            os.replace(tmp, out / "pairs.jsonl")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    state.wait_for_everyone()
    return summary


def summary_table(summary: dict) -> str:
    """A markdown table of the per-generator summary."""
    lines = ["| generator | mean score | mean rank | images |", "|---|---|---|---|"]
    for name, s in summary["generators"].items():
        lines.append(f"| {name} | {s['mean_score']:.3f} | {s['mean_rank']:.2f} | {s['images']} |")
    return "\n".join(lines)


__all__ = ["GenerateConfig", "GeneratorConfig", "generate_ranked", "summary_table"]
