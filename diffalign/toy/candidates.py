"""The toy world's candidate images: sampled from a model, scored by the toy preference, and written in every
data layout the trainer reads (pairs, ranked lists, captioned and labelled images). The demo and the toy datasets
(``toy:pairs`` and the like) are both made with these."""

from __future__ import annotations

import io
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from diffalign.diffusion.sampling import CLIP_FPS, generate, to_pil
from diffalign.toy.judge import preference_scores
from diffalign.toy.world import parse_caption, random_scene, render


def _png(image: torch.Tensor) -> bytes:
    """An image (3, H, W) as PNG bytes; a clip (3, F, H, W) as a lossless animated WebP's (no codec blurs a frame, so
    the toy video preference reads the clip the model made), which the data readers decode as a video."""
    buffer = io.BytesIO()
    if image.dim() == 3:
        to_pil(image).save(buffer, format="PNG")
    else:
        frames = [to_pil(frame) for frame in image.unbind(1)]
        frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / CLIP_FPS),
                       loop=0, lossless=True)
    return buffer.getvalue()


@dataclass
class Candidates:
    """``candidates`` images (or clips) per group sampled from one model, with their scores (the toy preference's, or
    another reward's)."""

    prompts: list[str]  # one per group
    images: torch.Tensor  # (G, K, 3, H, W) in [0, 1]; clips (G, K, 3, F, H, W)
    scores: torch.Tensor  # (G, K)


def sample_candidates(pipe, prompts: Sequence[str], *, groups_per_prompt: int, candidates: int, seed: int,
                      steps: int, guidance_scale: float,
                      score: Callable[[torch.Tensor, list[str]], torch.Tensor] = preference_scores,
                      frames: int = 0, resolution: int | None = None) -> Candidates:
    """Sample K images per group (``groups_per_prompt`` groups per prompt) and ``score`` them (images, prompts); on a
    video pipeline clips of ``frames`` frames; ``resolution`` pixels square (None: the pipeline's default size)."""
    group_prompts = [p for p in prompts for _ in range(groups_per_prompt)]
    expanded = [p for p in group_prompts for _ in range(candidates)]
    seeds = [seed + i for i in range(len(expanded))]
    images = generate(pipe, expanded, seeds, steps=steps, guidance_scale=guidance_scale, frames=frames,
                      resolution=resolution,
                      progress=f"sampling {len(expanded)} toy {'clips' if frames else 'images'} ({candidates} per "
                               "group) to pair up")
    scores = score(images, expanded)
    return Candidates(group_prompts, images.view(len(group_prompts), candidates, *images.shape[1:]),
                      scores.view(len(group_prompts), candidates))


def write_pairs(candidates: Candidates, out: Path) -> Path:
    """Best-vs-worst pair of each group, as a Pick-a-Pic-style parquet file. A group whose candidates all score the same
    makes no pair (neither image is preferred); how many were dropped is said on stderr, and a set of groups none of
    which makes a pair is refused rather than written as an empty table."""
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
    groups, pairs = len(candidates.prompts), len(rows["caption"])
    if pairs == 0:
        raise ValueError(f"none of the {groups} groups of candidates makes a pair: every candidate of each scored the "
                         "same, so no image is preferred to another")
    if pairs < groups:
        print(f"{out.name}: {groups - pairs} of {groups} groups dropped, their candidates all scored the same "
              f"({pairs} pairs written)", file=sys.stderr, flush=True)
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
