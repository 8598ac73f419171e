"""`diffalign generate-ranked` on the toy world: lists RankDPO trains on, pairs SmPO trains on,
the ensemble ranking, and a resume that neither duplicates nor loses anything."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.data import PairDataset, RankedListDataset
from diffalign.errors import UserError
from diffalign.rewards import ensemble
from diffalign.synth import GenerateConfig, generate_ranked
from diffalign.train import load_config

ROOT = Path(__file__).resolve().parent.parent


def _overrides(out: Path, *extra: str) -> list[str]:
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a red circle\nan orange square\na blue triangle\n")
    return [f"prompts={prompts}", f"output_dir={out}", "shard_size=2",
            "generators=[{name: cfg5, path: assets/models/toy-base, steps: 4}, "
            "{name: cfg1, path: assets/models/toy-base, steps: 4, guidance_scale: 1.0}]", *extra]


def _config(out: Path, *extra: str) -> GenerateConfig:
    return load_config(ROOT / "configs/toy_generate_ranked.yaml", _overrides(out, *extra), schema=GenerateConfig)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*generate_ranked.yaml")), ids=lambda p: p.name)
def test_shipped_generate_configs_validate(path):
    config = load_config(path, schema=GenerateConfig)
    assert len(config.generators) >= 2 and config.rewards


@pytest.mark.slow
def test_generate_ranked_writes_lists_pairs_and_a_summary_and_resumes_exactly(tmp_path):
    out = tmp_path / "ranked"
    summary = generate_ranked(_config(out))
    assert summary["prompts"] == 3 and summary["images_generated_now"] == 3 * 2 * 2
    rows = [r for s in ("00000", "00001") for r in pq.read_table(out / f"shard-{s}.parquet").to_pylist()]
    assert [r["caption"] for r in rows] == ["a red circle", "an orange square", "a blue triangle"]
    for r in rows:  # every raw score kept; the list score is the per-prompt rank average of the two rewards
        assert r["generators"] == ["cfg5", "cfg5", "cfg1", "cfg1"] and len(set(r["seeds"])) == 2
        raw = {"p": torch.tensor(r["reward_toy_preference"]), "a": torch.tensor(r["reward_toy_adherence"])}
        expected = ensemble(raw, torch.zeros(4, dtype=torch.long), "rank")
        torch.testing.assert_close(torch.tensor(r["scores"], dtype=torch.float64), expected)

    lists = RankedListDataset(out, resolution=32)  # what rank_dpo trains on
    assert len(lists) == 3 and lists.example(0).pixels.shape == (4, 3, 32, 32)
    pairs = PairDataset(out / "pairs.jsonl", resolution=32,  # what smpo trains on
                        score_columns=[("toy_preference_0", "toy_preference_1")], ties="soft")
    assert len(pairs) == 3 and all(pairs.example(i).preference >= 0.5 for i in range(3))
    assert set(summary["generators"]) == {"cfg5", "cfg1"}
    assert json.loads((out / "summary.json").read_text())["generators"]["cfg5"]["images"] == 6

    # a stop mid-way: one image and one shard lost; the rerun makes only those, identically
    before = pq.read_table(out / "shard-00001.parquet").to_pylist()
    (out / "shard-00001.parquet").unlink()
    (out / rows[2]["images"][3]).unlink()
    again = generate_ranked(_config(out))
    assert again["images_generated_now"] == 1 and again["prompts"] == 3
    assert pq.read_table(out / "shard-00001.parquet").to_pylist() == before
    assert len(list(out.glob("shard-*.parquet"))) == 2 and not list(out.rglob("*.tmp"))

    with pytest.raises(UserError, match="different config .*seeds_per_generator"):
        generate_ranked(_config(out, "seeds_per_generator=3"))


@pytest.mark.slow
def test_two_processes_write_the_dataset_one_process_writes(tmp_path):
    """Under torchrun each process generates every other missing image and scores every other shard;
    images, shards and pairs are byte for byte those of one process (one image per batch and one
    thread per process, so every image is computed alike), and the summary is printed once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = ["-m", "diffalign", "generate-ranked", str(ROOT / "configs/toy_generate_ranked.yaml"), "batch_size=1"]
    runs = {"one": [sys.executable, *command],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]}
    from fixtures import run_together

    for name in runs:
        (tmp_path / name).mkdir()
    launches = {name: [*launch, *_overrides(tmp_path / name / "ranked")] for name, launch in runs.items()}
    printed = {}
    for name, done in run_together(launches, cwd=ROOT, env=env).items():
        assert done.returncode == 0, done.stderr[-3000:]
        printed[name] = done.stdout
    assert printed["two"].count("images generated in this run") == 1 and "(12 images generated" in printed["two"]

    def files(run: str) -> dict[str, bytes]:
        folder = tmp_path / run / "ranked"
        return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}

    one, two = files("one"), files("two")
    assert one.keys() == two.keys() and len([f for f in one if f.endswith(".png")]) == 12
    assert {f for f in one if one[f] != two[f]} == {"generate_config.yaml"}  # it names each run's prompts file


@pytest.mark.slow
def test_a_generator_reads_a_folder_of_fp16_variant_weights_when_given_its_variant(tmp_path):
    from diffalign.diffusion import load_pipeline

    load_pipeline(ROOT / "assets/models/toy-base").save_pretrained(tmp_path / "fp16-only", variant="fp16")
    out = tmp_path / "ranked"
    generators = (f"generators=[{{name: plain, path: assets/models/toy-base, steps: 2}}, "
                  f"{{name: variant, path: {tmp_path / 'fp16-only'}, variant: fp16, steps: 2}}]")
    generate_ranked(_config(out, generators, "seeds_per_generator=1"))
    row = pq.read_table(out / "shard-00000.parquet").to_pylist()[0]
    plain, variant = (Image.open(out / path) for path in row["images"])
    assert row["generators"] == ["plain", "variant"] and np.array_equal(np.asarray(plain), np.asarray(variant))
    with pytest.raises(UserError, match="holds fp16 weights.*generator's variant"):
        generate_ranked(_config(tmp_path / "again", generators.replace(", variant: fp16", "")))


def test_a_missing_generator_is_named_before_any_image_is_generated(tmp_path):
    out = tmp_path / "ranked"
    generators = (f"generators=[{{name: fine, path: assets/models/toy-base, steps: 2}}, "
                  f"{{name: lost, path: {tmp_path / 'nowhere'}, steps: 2}}]")
    with pytest.raises(UserError, match="nowhere does not exist"):
        generate_ranked(_config(out, generators))
    assert not out.exists()  # it made nothing: the folder it created is gone, not left behind untracked


def test_a_run_that_fails_after_making_images_keeps_them_and_says_where(tmp_path, monkeypatch):
    out = tmp_path / "ranked"
    import diffalign.synth.ranked as ranked

    def no_reward(spec):
        raise UserError("the reward model cannot be read")

    monkeypatch.setattr(ranked, "load_reward", no_reward)  # fails after every image is made, before scoring
    with pytest.raises(UserError, match=f"What this run made is kept in {out}: .*run the same command again"):
        generate_ranked(_config(out))
    assert list(out.rglob("*.png"))


@pytest.mark.slow
def test_generate_ranked_edits_each_rows_sources_and_keeps_them_for_training(tmp_path):
    """Edits: a table of instructions with a source image each, two FLUX.2 klein generators (the tiny model at two
    guidance scales) editing it; image_similarity scores each edit against its source; the lists and pairs keep
    the source column, so they train edits with data.source_columns as they are."""
    from fixtures import pickapic_parquet, tiny_clip_folder

    from diffalign.data.open import open_dataset
    from diffalign.diffusion import load_pipeline

    model = tmp_path / "klein"
    load_pipeline(ROOT / "assets/models/tiny-flux2-klein", random_init=True).save_pretrained(model)
    table = pickapic_parquet(tmp_path / "edits.parquet", 2, sources=("source",))
    clip = tiny_clip_folder(tmp_path / "clip")
    out = tmp_path / "ranked"
    config = load_config(ROOT / "configs/toy_generate_ranked.yaml", [
        f"prompts={table}", f"output_dir={out}", "source_columns=[source]", "source_resolution=64",
        f"generators=[{{name: a, path: {model}, steps: 2, resolution: 64, width: 96}}, "
        f"{{name: b, path: {model}, steps: 2, resolution: 64, width: 96, guidance_scale: 1.0}}]",
        f"rewards=[image_similarity:{clip}, jpeg_incompressibility]"], schema=GenerateConfig)
    summary = generate_ranked(config)
    assert summary["prompts"] == 2 and summary["images_generated_now"] == 2 * 2 * 2
    rows = pq.read_table(out / "shard-00000.parquet").to_pylist()
    assert [r["source"] for r in rows] == ["images/p000000/source-source.png", "images/p000001/source-source.png"]
    assert {Image.open(out / path).size for r in rows for path in r["images"]} == {(96, 64)}  # each generator's width
    assert all(0 < s <= 1 + 1e-5 for r in rows for s in r["reward_image_similarity"])
    pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["source"] == rows[0]["source"]
    for layout, path in (("ranked", out), ("pairs", out / "pairs.jsonl")):
        data = load_config(ROOT / "configs/toy_rank_dpo.yaml", [f"data.path={path}", "data.resolution=32",
                                                                 "data.source_columns=[source]"]).data
        assert len(open_dataset(data, layout).read(0).source_ids) == 1
