"""What the tests change in a shipped config to run it on a CPU (the recipes' tiny counterparts, the toy
configs' size) and the tiny training configs several tests start from; shared by the tests, in one place."""

from __future__ import annotations

from pathlib import Path

from diffalign.paths import ROOT
from diffalign.recipes.smoke import (  # noqa: F401  (shared with --smoke: the tests apply what a user's smoke run does)
    SHORTER,
    SMALLER,
    TINY,
    SampleData,
    cpu_overrides,
    is_toy,
    toy_size_overrides,
)
from diffalign.train import load_config


def recipe_data(root: Path) -> SampleData:
    """Sample data of each layout an objective reads, written in ``root`` on first use (the package's, as
    ``diffalign train CONFIG --smoke`` writes it)."""
    return SampleData(root)


def tiny_config(data: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml",
                       [f"data.path={data}", f"output_dir={out}", "model.path=" + str(ROOT / "assets/models/tiny-sdxl"),
                        *overrides])
