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

import pytest
from run_configs import TINY, cpu_overrides, recipe_data
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffalign.paths import CONFIGS
from diffalign.train import load_config, train

RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml")
                 if not p.name.startswith(("toy_", "tiny_")) and not p.name.endswith("generate_ranked.yaml"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return recipe_data(tmp_path_factory.mktemp("recipe-data"))


def test_every_recipe_is_tested_on_a_tiny_counterpart():
    assert RECIPES and all(recipe.split("_")[0] in TINY for recipe in RECIPES), RECIPES


@pytest.mark.slow
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
