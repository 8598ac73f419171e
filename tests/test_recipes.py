"""Every shipped recipe runs as shipped: each configs/ file that is not a toy_ or tiny_ one trains two
optimiser steps on its architecture's tiny random counterpart, from a working directory of its own (so
the recipe's relative cache_dir and output paths are used as written).

Only what a CPU cannot do is overridden, and all of it is in :func:`cpu_overrides`: the real weights
(model path, random init, reward models that need weights), the size (resolution, batch, accumulation,
steps, an online round's size) and 8-bit AdamW (bitsandbytes needs CUDA). The tracker (tensorboard, the
default), caching, flips, EMA, checkpoints, mixed precision and every loss setting stay as shipped. This
test was added after every SD1.5/SDXL/SD3 recipe stopped at start on the tensorboard tracker (the config
went to torch's add_hparams nested), which no toy-config test could see.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from fixtures import chat_lm, conversations_parquet, images_parquet, pickapic_parquet, ranked_parquet
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffalign.objectives import OBJECTIVES
from diffalign.paths import ASSETS, CONFIGS
from diffalign.train import load_config, train

RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml")
                 if not p.name.startswith(("toy_", "tiny_")) and not p.name.endswith("generate_ranked.yaml"))
# a recipe's prefix -> its tiny architecture; a language model's is the toy LM's with a chat template (`lm` below)
TINY = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "sd35": "tiny-sd3", "flux": "tiny-flux",
        "qwen": "lm"}


def recipe_data(root: Path) -> dict[str, Path]:
    """Tiny data of each layout an objective reads, with the columns the recipes name, in ``root``."""
    pairs = pickapic_parquet(root / "pairs.parquet", 4)
    # sdxl_smpo.yaml reads PickScore's scores of both images as pickscore_0 / pickscore_1
    table = pq.read_table(pairs)
    table = table.append_column("pickscore_0", table["pick_0"]).append_column("pickscore_1", table["pick_1"])
    pq.write_table(table, pairs)
    return {"pairs": pairs, "ranked": ranked_parquet(root / "ranked.parquet"),
            "images": images_parquet(root / "images.parquet", 4),
            "labelled_images": images_parquet(root / "labelled.parquet", 4, labels=[1, 0, 1, 0]),
            # language models: TRL's conversational formats (UltraFeedback's pairs, kto-mix's labelled rows)
            "lm": chat_lm(root / "chat-lm"), "text_pairs": conversations_parquet(root / "conversations.parquet"),
            "text_unpaired": conversations_parquet(root / "labelled-conversations.parquet", layout="unpaired")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return recipe_data(tmp_path_factory.mktemp("recipe-data"))


def cpu_overrides(recipe: str, data: dict[str, Path]) -> list[str]:
    """The keys a CPU run of ``recipe`` changes, and nothing else."""
    shipped = yaml.safe_load((CONFIGS / recipe).read_text())
    objective = OBJECTIVES[shipped["objective"]["name"]]
    tiny = TINY[recipe.split("_")[0]]
    keys = [f"model.path={data['lm'] if tiny == 'lm' else ASSETS / 'models' / tiny}", "model.random_init=true",  # weights
            "data.resolution=32", "train.batch_size=1", "train.gradient_accumulation=1", "train.max_steps=2"]  # size
    real = getattr(objective, "real_data", False)  # DDO: online, pairing real images with its samples
    if objective.dataset != "online" or real:
        keys.append(f"data.path={data['images' if real else objective.dataset]}")  # the recipe's data
    if shipped["train"].get("adam_8bit"):
        keys.append("train.adam_8bit=false")  # bitsandbytes is CUDA-only
    if objective.dataset == "online":  # a round of 2 groups in 2 steps, of 2-step samples
        keys += ["online.groups_per_round=2", "online.sample_batch_size=2", "online.steps_per_round=2",
                 "objective.sample_steps=2"]
    if objective.dataset == "online" and objective.scored:
        # the reward model needs real weights; the toy reward judges toy prompts
        keys += ["online.reward=toy_preference", "online.prompts=toy_train"]
    return keys


def test_every_recipe_is_tested_on_a_tiny_counterpart():
    assert RECIPES and all(recipe.split("_")[0] in TINY for recipe in RECIPES), RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_recipe_trains_as_shipped_on_its_tiny_architecture(recipe, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / recipe, cpu_overrides(recipe, data))
    assert config.train.report_to == "tensorboard"  # the default tracker, as users run it
    summary = train(config)
    run = tmp_path / config.output_dir
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and logged[-1]["step"] == 2 and math.isfinite(logged[-1]["loss"])
    assert (run / "final").is_dir()
    if config.data.cache_dir:  # the recipe's relative cache folder, where it says
        assert any((tmp_path / config.data.cache_dir).iterdir())
    events = EventAccumulator(str(run / "diffalign")).Reload()
    assert "loss" in events.Tags()["scalars"]
