"""Every toy config trains on a fresh clone with no other command first: the data it names
(``toy:pairs`` ...) is made from the shipped toy model on first use, cached, the same on every machine.

The test runs each config from the repository's root, as a newcomer would, overriding only the output
folder, the size (steps, batch, validation images, an online round or an inversion's length) and the
toy data's size (1 group of 2 candidates per prompt instead of 16 of 4, the session's
``small_toy_datasets``), in :func:`toy_size_overrides`.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from run_configs import toy_size_overrides

from diffalign.errors import UserError
from diffalign.paths import CONFIGS, ROOT
from diffalign.toy import datasets
from diffalign.train import load_config, train

TOY_CONFIGS = sorted(p.name for p in [*CONFIGS.glob("toy_*.yaml"), *CONFIGS.glob("sign_*.yaml")]
                     if p.name != "toy_generate_ranked.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", TOY_CONFIGS)
def test_the_toy_config_trains_from_the_repository_root_with_nothing_made_first(name, small_toy_datasets, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(ROOT)
    objective = name.removeprefix("toy_").removeprefix("sign_").removesuffix(".yaml")
    config = load_config(CONFIGS / name, [f"output_dir={tmp_path / 'run'}", *toy_size_overrides(name)])
    summary = train(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(math.isfinite(v) for v in losses)
    if datasets.is_toy_dataset(config.data.path) and objective != "d3po":
        assert datasets.toy_dataset(config.data.path).is_file()  # made on first use, in the cache


@pytest.mark.slow
def test_the_toy_datasets_are_the_same_every_time_they_are_made(tmp_path):
    first = datasets.make_toy_datasets(tmp_path / "a", groups_per_prompt=1, candidates=2)
    second = datasets.make_toy_datasets(tmp_path / "b", groups_per_prompt=1, candidates=2)
    for name in datasets.NAMES:
        a, b = pq.read_table(first / f"{name}.parquet"), pq.read_table(second / f"{name}.parquet")
        assert a.num_rows > 0 and a.equals(b), name
    pairs = pq.read_table(first / "pairs.parquet").to_pydict()
    assert all(s0 > s1 for s0, s1 in zip(pairs["score_0"], pairs["score_1"]))  # winner first
    assert not list(tmp_path.glob(".*"))  # nothing half-made left beside them


def test_a_missing_local_data_path_is_reported_as_a_missing_file_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / "toy_diffusion_dpo.yaml", [f"model.path={ROOT / 'assets/models/toy-base'}",
                                                               "data.path=runs/toy_pairs/pairs.parquet"])
    with pytest.raises(UserError, match="reads as a local path") as err:
        train(config)
    assert "hf download" not in str(err.value) and "toy:pairs" in str(err.value)
    with pytest.raises(UserError, match="no toy dataset; the toy datasets are toy:pairs"):
        datasets.toy_dataset("toy:pears")


def test_groups_that_make_no_pair_are_said_and_a_set_that_makes_none_is_refused(tmp_path, capsys):
    """write_pairs: the best and worst candidate of each group whose scores differ; the dropped groups counted on
    stderr; no pair at all is an error, not an empty table."""
    from diffalign.toy.candidates import Candidates, write_pairs

    images = torch.rand(3, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[0.2, 0.9], [0.5, 0.5], [-1.0, -0.3]])
    table = pq.read_table(write_pairs(Candidates(["a", "b", "c"], images, scores), tmp_path / "pairs.parquet"))
    assert table.column("caption").to_pylist() == ["a", "c"]
    assert table.column("score_0").to_pylist() == pytest.approx([0.9, -0.3])
    assert "1 of 3 groups dropped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="none of the 2 groups"):
        write_pairs(Candidates(["a", "b"], images[:2], torch.zeros(2, 2)), tmp_path / "none.parquet")
    assert not (tmp_path / "none.parquet").exists()
