"""The sign world's OCR-ranked pairs by name (``data.path: sign:pairs``), made from the shipped sign base on first use.

The sign world (:mod:`diffalign.toy.sign_world`) has no toy judge: its images are scored by a real OCR model, which
lives in the rewards layer, above the toy world; so its data is made here, where both are at hand, and named through
the data layer's scheme registry (:mod:`diffalign.data.named`) as the toy worlds' ``toy:`` datasets are. The first
run that asks samples ``GROUPS_PER_PROMPT`` groups of ``CANDIDATES`` images per training word (seed 0), scores each
with Flow-GRPO's OCR reward read by PP-OCRv4 (about two minutes on 2 CPU cores; it needs
``pip install 'diffalign[ocr]'``) and keeps the tables in the cache folder beside the toy datasets.

| name | layout | what |
| --- | --- | --- |
| ``sign:pairs`` | caption, jpg_0, jpg_1, label_0, score_0, score_1 | each group's best- vs worst-spelled image |
"""

from __future__ import annotations

from pathlib import Path

from diffalign.errors import UserError

PREFIX = "sign:"
NAMES = ("pairs",)
GROUPS_PER_PROMPT = 4
CANDIDATES = 4
SEED = 0
OCR = "ocr:detect_side=160"  # the reward the pairs are ranked by, as the sign configs' rounds score


def make_sign_datasets(folder: Path, *, groups_per_prompt: int, candidates: int, seed: int = SEED) -> Path:
    """Sample the shipped sign base on the training words, score every image with the OCR reward, and write the
    tables above into ``folder`` as ``<name>.parquet``, whole or not at all."""
    from diffalign.diffusion import load_pipeline
    from diffalign.paths import TOY_SIGN
    from diffalign.rewards import load_reward
    from diffalign.toy.candidates import sample_candidates, write_pairs
    from diffalign.toy.datasets import made_whole
    from diffalign.toy.sign_world import prompts

    def fill(partial: Path) -> None:
        found = sample_candidates(load_pipeline(TOY_SIGN), prompts("train"), groups_per_prompt=groups_per_prompt,
                                  candidates=candidates, seed=seed, steps=20, guidance_scale=5.0,
                                  score=load_reward(OCR))
        write_pairs(found, partial / "pairs.parquet")

    return made_whole(folder, fill)


def sign_dataset(source: str | Path) -> Path:
    """The parquet file of the sign dataset ``source`` names (``sign:pairs``), made first if it is not in the cache.
    Under several processes the main one makes it while the others wait."""
    from diffalign.toy.datasets import cache_root, made_on_first_use

    name = str(source).removeprefix(PREFIX)
    if name not in NAMES:
        raise UserError(f"{source} names no sign dataset; the sign datasets are {', '.join(PREFIX + n for n in NAMES)}")
    folder = cache_root() / "sign-data" / f"groups{GROUPS_PER_PROMPT}-candidates{CANDIDATES}-seed{SEED}"
    return made_on_first_use(
        folder / f"{name}.parquet",
        f"making the sign world's pairs from the shipped sign base into {folder}, read by PP-OCRv4",
        lambda: make_sign_datasets(folder, groups_per_prompt=GROUPS_PER_PROMPT, candidates=CANDIDATES, seed=SEED))
