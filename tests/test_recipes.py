"""Every shipped recipe runs as shipped: ``diffalign train configs/RECIPE --smoke``, the command docs/recipes.md
gives a user, trains two optimiser steps on the recipe's tiny random counterpart, from a working directory of its
own (so the recipe's relative cache_dir is used as written).

Only what a CPU cannot do is overridden, all of it in :func:`diffalign.recipes.smoke.recipe_overrides`, which
``--smoke`` prints: the real weights (model path, random init, reward models that need weights), the size
(resolution, batch, accumulation, steps, an online round's size), the data (a sample of the recipe's layout),
8-bit AdamW (bitsandbytes needs CUDA) and the output folder. The tracker (tensorboard, the default), caching,
flips, EMA, checkpoints, mixed precision and every loss setting stay as shipped. This test was added after every
SD1.5/SDXL/SD3 recipe stopped at start on the tensorboard tracker (the config went to torch's add_hparams
nested), which no toy-config test could see.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffalign.cli import main
from diffalign.paths import ROOT
from diffalign.recipes.smoke import is_toy, smoke_folder, tiny_counterpart
from diffalign.train import load_config

RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                 if not is_toy(p) and not p.name.endswith("generate_ranked.yaml"))


def test_every_recipe_is_tested_on_a_tiny_counterpart():
    assert RECIPES and all(tiny_counterpart(recipe) for recipe in RECIPES), RECIPES


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_recipe_trains_as_shipped_on_its_tiny_architecture(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    assert main(["train", f"configs/{recipe}", "--smoke"]) == 0
    said = capsys.readouterr().out
    work = tmp_path / smoke_folder(recipe)
    run = work / "run"
    config = load_config(run / "config.yaml")
    shipped = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    assert config.train.report_to == "tensorboard" == shipped["train"].get("report_to", "tensorboard")
    for line in said.splitlines()[1:]:  # each key changed is said, with its reason
        if not line.startswith("  "):
            break
        assert "  (" in line
    assert "model.random_init=true" in said and "smoke run passed" in said
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and math.isfinite(logged[-1]["loss"])
    assert (run / "final").is_dir()
    if config.data.cache_dir:  # the recipe's relative cache folder, where it says
        assert config.data.cache_dir == shipped["data"]["cache_dir"]
        assert any((tmp_path / config.data.cache_dir).iterdir())
    events = EventAccumulator(str(run / "diffalign")).Reload()
    assert "loss" in events.Tags()["scalars"]
