"""The toy world's training data by name, made from the shipped base model on first use.

Every ``configs/toy_*.yaml`` that reads a dataset names one of these (``data.path: toy:pairs``), so
each trains on a fresh clone with no other command first. The first run that asks samples the
candidates once (``GROUPS_PER_PROMPT`` groups of ``CANDIDATES`` images per training prompt, seed 0,
about a minute on 2 CPU cores), writes every layout from them and keeps them in the cache folder
(``$DIFFALIGN_CACHE``, default ``~/.cache/diffalign``); later runs read them back. The data is a pure
function of the shipped model and these settings, so every machine makes the same tables, and
``scripts/bench_alignment.py`` trains on the very same ones.

| name | layout | what |
| --- | --- | --- |
| ``toy:pairs`` | caption, jpg_0, jpg_1, label_0, score_0, score_1 | each group's best vs worst image |
| ``toy:ranked`` | caption, images, scores | each whole group, with the toy preference's scores |
| ``toy:images`` | caption, image | every candidate, no scores (Self-NPO's data) |
| ``toy:labelled`` | caption, image, label | every candidate, liked when above the mean score (Diffusion-KTO) |
| ``toy:world`` | caption, image | rendered scenes of the world itself, as many (DDO's real data) |
| ``toy:dissatisfied`` | caption, image | each group's worst image, marked dissatisfying (DRIFT's negatives) |

The toy video world (:mod:`diffalign.toy.video_world`) has its own, made the same way from the shipped toy video model
(``assets/models/toy-video``: ``GROUPS_PER_PROMPT`` groups of ``CANDIDATES`` clips of ``video_world.FRAMES`` frames per
training prompt, scored by the toy video preference; lossless animated WebP cells, which the readers decode as videos):

| name | layout | what |
| --- | --- | --- |
| ``toy:video_pairs`` | caption, jpg_0, jpg_1, label_0, score_0, score_1 | each group's smoothest vs roughest clip |
| ``toy:video_ranked`` | caption, images, scores | each whole group, with the toy video preference's scores |
| ``toy:video_labelled`` | caption, image, label | every clip, liked when above the mean score |

The toy text world (:mod:`diffalign.toy.text_world`) has its own, made the same way from the shipped toy LM
(``TEXT_GROUPS_PER_PROMPT`` groups of ``CANDIDATES`` completions per training prompt; seconds):

| name | layout | what |
| --- | --- | --- |
| ``toy:text_pairs`` | prompt, chosen, rejected, score_chosen, score_rejected | each group's best vs worst completion |
| ``toy:text_labelled`` | prompt, completion, label | every completion, desirable when above its group's mean |
| ``toy:text_ranked`` | prompt, completions, scores | each whole group, with the toy preference's scores |
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffalign.errors import UserError

PREFIX = "toy:"
NAMES = ("pairs", "ranked", "images", "labelled", "world", "dissatisfied")
TEXT_NAMES = ("text_pairs", "text_labelled", "text_ranked")
VIDEO_NAMES = ("video_pairs", "video_ranked", "video_labelled")
GROUPS_PER_PROMPT = 16
TEXT_GROUPS_PER_PROMPT = 64
CANDIDATES = 4
SEED = 0
VIDEO_STEPS = 20  # the toy video model's sampling steps for its candidates (UniPC)


def is_toy_dataset(source: str | Path) -> bool:
    """Whether ``source`` names a toy dataset (``toy:pairs`` ...) rather than a path."""
    return str(source).startswith(PREFIX)


def cache_root() -> Path:
    """Where diffalign keeps what it makes once and reuses: ``$DIFFALIGN_CACHE``, else ``~/.cache/diffalign``."""
    return Path(os.environ.get("DIFFALIGN_CACHE") or Path.home() / ".cache" / "diffalign")


def _folder(groups_per_prompt: int, candidates: int, seed: int, world: str = "toy-data") -> Path:
    # the settings are in the name: a smaller set made for a quick check is never read as the full one
    return cache_root() / world / f"groups{groups_per_prompt}-candidates{candidates}-seed{seed}"


def made_whole(folder: Path, fill: Callable[[Path], None]) -> Path:
    """``fill`` a new folder beside ``folder``, then rename it into place (replacing an older one): an
    interrupted run leaves no half-made folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fill(partial)
        shutil.rmtree(folder, ignore_errors=True)  # made again: a folder is replaced whole
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def make_toy_datasets(folder: Path, *, groups_per_prompt: int, candidates: int, seed: int = SEED) -> Path:
    """Sample the candidates from the shipped base model and write every image layout of the table above into
    ``folder`` as ``<name>.parquet``, whole or not at all."""
    from diffalign.diffusion import load_pipeline
    from diffalign.paths import TOY_BASE
    from diffalign.toy.candidates import (
        sample_candidates,
        write_dissatisfied,
        write_images,
        write_labelled_images,
        write_pairs,
        write_ranked,
        write_world_images,
    )
    from diffalign.toy.world import prompts

    def fill(partial: Path) -> None:
        found = sample_candidates(load_pipeline(TOY_BASE), prompts("train"), groups_per_prompt=groups_per_prompt,
                                  candidates=candidates, seed=seed, steps=20, guidance_scale=5.0)
        write_pairs(found, partial / "pairs.parquet")
        write_ranked(found, partial / "ranked.parquet")
        write_images(found, partial / "images.parquet")
        write_labelled_images(found, partial / "labelled.parquet")
        write_dissatisfied(found, partial / "dissatisfied.parquet")
        write_world_images(prompts("train"), groups_per_prompt * candidates, partial / "world.parquet", seed=seed)

    return made_whole(folder, fill)


def make_toy_video_datasets(folder: Path, *, groups_per_prompt: int, candidates: int, seed: int = SEED) -> Path:
    """Sample the shipped toy video model's clips for the video world's training prompts and write the video layouts
    into ``folder``, whole or not at all."""
    from diffalign.diffusion import load_pipeline
    from diffalign.paths import TOY_VIDEO
    from diffalign.toy.candidates import sample_candidates, write_labelled_images, write_pairs, write_ranked
    from diffalign.toy.video_judge import video_preference_scores
    from diffalign.toy.video_world import FRAMES, SIZE, prompts

    def fill(partial: Path) -> None:
        found = sample_candidates(load_pipeline(TOY_VIDEO), prompts("train"), groups_per_prompt=groups_per_prompt,
                                  candidates=candidates, seed=seed, steps=VIDEO_STEPS, guidance_scale=5.0,
                                  score=video_preference_scores, frames=FRAMES, resolution=SIZE)
        write_pairs(found, partial / "video_pairs.parquet")
        write_ranked(found, partial / "video_ranked.parquet")
        write_labelled_images(found, partial / "video_labelled.parquet")

    return made_whole(folder, fill)


def make_toy_text_datasets(folder: Path, *, groups_per_prompt: int, candidates: int, seed: int = SEED) -> Path:
    """Sample the shipped toy LM's completions and write the text layouts into ``folder``, whole or not at all."""
    from diffalign.toy.text_data import sample_text_candidates, write_text_labelled, write_text_pairs, write_text_ranked

    def fill(partial: Path) -> None:
        groups = sample_text_candidates(groups_per_prompt, candidates, seed)
        write_text_pairs(groups, partial / "text_pairs.parquet")
        write_text_labelled(groups, partial / "text_labelled.parquet")
        write_text_ranked(groups, partial / "text_ranked.parquet")

    return made_whole(folder, fill)


def made_on_first_use(table: Path, announce: str, make: Callable[[], Path]) -> Path:
    """``table``, made by ``make()`` first when it is not there (saying ``announce``, with the reason). Under several
    processes the main one makes it while the others wait."""
    if not table.is_file():  # not made yet, or made before this layout existed: the folder is made again whole
        from diffalign.diffusion.loading import process_state

        with process_state().main_process_first():
            if not table.is_file():
                print(f"{announce} (once, for every later run; the bar below shows how far it is)", flush=True)
                make()
    return table


def toy_dataset(source: str | Path) -> Path:
    """The parquet file of the toy dataset ``source`` names (``toy:pairs`` ...), made first if it is not
    in the cache. Under several processes the main one makes it while the others wait."""
    name = str(source).removeprefix(PREFIX)
    worlds = _worlds()
    world = next((w for w in worlds if name in w.names), None)
    if world is None:
        raise UserError(f"{source} names no toy dataset; the toy datasets are "
                        f"{', '.join(PREFIX + n for w in worlds for n in w.names)}")
    folder = _folder(world.groups_per_prompt, CANDIDATES, SEED, world.folder)
    return made_on_first_use(
        folder / f"{name}.parquet", f"making the {world.what} from the shipped {world.made_by} into {folder}",
        lambda: world.make(folder, groups_per_prompt=world.groups_per_prompt, candidates=CANDIDATES, seed=SEED))


@dataclass(frozen=True)
class _World:
    """Where a toy world's datasets come from: their names, their cache folder, how many groups each prompt gets."""

    names: tuple[str, ...]
    folder: str
    groups_per_prompt: int
    what: str
    made_by: str
    make: Callable[..., Path]


def _worlds() -> tuple[_World, ...]:
    """The toy worlds' datasets, at the sizes this module's settings give now (a test makes them smaller)."""
    return (
        _World(NAMES, "toy-data", GROUPS_PER_PROMPT, "toy datasets", "base model", make_toy_datasets),
        _World(TEXT_NAMES, "toy-text-data", TEXT_GROUPS_PER_PROMPT, "toy text datasets", "toy LM",
               make_toy_text_datasets),
        _World(VIDEO_NAMES, "toy-video-data", GROUPS_PER_PROMPT, "toy video datasets", "toy video model",
               make_toy_video_datasets),
    )
