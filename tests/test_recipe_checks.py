"""The checks a newcomer runs before renting a GPU: ``train --plan`` on every shipped recipe, ``train --smoke`` on a
toy config, ``diffalign data check`` / ``data example`` on every layout, and the recipe index of docs/recipes.md.
(Every recipe's ``--smoke`` is tests/test_recipes.py.)"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from diffalign.cli import main
from diffalign.data.layouts import LAYOUTS
from diffalign.objectives import OBJECTIVES
from diffalign.paths import ASSETS, ROOT
from diffalign.recipes.index import LOCAL_DATA
from diffalign.recipes.plan import SHIPPED_ARCHITECTURES, plan_lines
from diffalign.recipes.samples import pickapic_parquet, write_example
from diffalign.recipes.smoke import SampleData, is_toy, recipe_overrides, tiny_counterpart
from diffalign.train import load_config
from diffalign.train import memory
from diffalign.train.memory import training_step_memory

RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                 if not is_toy(p) and not p.name.endswith("generate_ranked.yaml"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> SampleData:
    return SampleData(tmp_path_factory.mktemp("samples"))


def _on_this_cpu(recipe: str, samples: SampleData) -> list[str]:
    """The plan's keys for a CPU: the tiny architecture (its memory is estimated in a second) and sample data (a video
    recipe's: clips of the smoke run's frames and width)."""
    tiny = tiny_counterpart(recipe)
    keys = [f"model.path={samples['lm'] if tiny == 'lm' else ASSETS / 'models' / tiny}"]
    keys += [str(o) for o in recipe_overrides(recipe, samples) if o.key in ("data.frames", "data.width")]
    data = [str(o) for o in recipe_overrides(recipe, samples) if o.key == "data.path"]  # the smoke run's sample
    return keys + (data or ["online.prompts=toy_train"])


def one_group_at_a_time(config: str) -> list[str]:
    """A recipe's online rounds sampled one group of two at a time for its plan's memory estimate (sizes): on fake
    tensors every image of a sampled batch is decoded by its own VAE call, each costing the same time whatever the
    image's size."""
    objective = OBJECTIVES[load_config(ROOT / "configs" / config).objective.name]
    if objective.dataset != "online":
        return []
    return ["online.sample_batch_size=1"] + ([] if objective.group_size_fixed else ["online.group_size=2"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_plan_of_every_recipe_says_what_it_reads_does_and_needs(recipe, samples, monkeypatch):
    overrides = [*_on_this_cpu(recipe, samples), "data.resolution=32", *one_group_at_a_time(recipe)]
    estimated = []  # (the config the plan estimated, the estimate): computed once, checked below

    def recorded(config, *args, **kwargs):
        estimated.append((config, training_step_memory(config, *args, **kwargs)))
        return estimated[-1][1]

    monkeypatch.setattr(memory, "training_step_memory", recorded)
    lines = plan_lines(ROOT / "configs" / recipe, overrides)
    text = "\n".join(lines)
    config = load_config(ROOT / "configs" / recipe, overrides)
    objective = OBJECTIVES[config.objective.name]
    assert f"method: {config.objective.name} ({objective.paper})" in text
    assert "(on this machine:" in text  # the model folder given
    if objective.dataset == "online" and not getattr(objective, "real_data", False):
        assert re.search(r"prompts: toy_train: [\d,]+ prompts", text)
    else:
        rows = 8 if objective.dataset == "text_unpaired" else 4  # two labelled completions of each prompt
        assert re.search(rf"data: .*: {rows} rows, layout", text) and f"{rows} usable, 0 bad" in text
    assert f"steps: {config.train.max_steps:,} optimiser steps" in text
    if objective.dataset.startswith("text_"):
        assert "memory: not estimated for language models" in text
    elif objective.samples_in_loss:  # its reward model runs inside the step, on real weights
        assert f"memory: not estimated for {config.objective.name}, which samples and scores inside its loss" in text
        assert "no rounds are stored" in text
    else:  # the estimate of scripts/bench_memory.py (the same function) for the recipe on random weights
        (used, row), = estimated
        expected = load_config(ROOT / "configs" / recipe, [*overrides, "model.random_init=true", "model.compile=false"])
        assert (used.model, used.objective, used.data) == (expected.model, expected.objective, expected.data)
        assert used.train.batch_size == expected.train.batch_size and used.train.lora_rank == expected.train.lora_rank
        assert f"memory: peak per GPU about {row['peak_gb']:.1f} GiB" in text
        if objective.dataset == "online":  # and what its rounds hold while they sample
            assert f"  sampling: {row['sampling_gb']:.1f} GiB while a round samples and decodes" in text
    resolved = yaml.safe_load("\n".join(lines[lines.index("the resolved config (every key, defaults included):") + 1:]))
    assert resolved["objective"]["name"] == config.objective.name and resolved["train"]["max_steps"] == config.train.max_steps
    assert resolved["data"]["resolution"] == 32  # overrides applied


def test_a_plan_on_a_laptop_names_what_to_download_and_estimates_on_the_shipped_architecture(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # neither the model, the data nor the prompt list is here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    lines = plan_lines(ROOT / "configs" / "sd15_dpo.yaml", memory=False)
    text = "\n".join(lines)
    assert "model: stable-diffusion-v1-5/stable-diffusion-v1-5: not on this machine" in text
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in text
    assert "hf download yuvalkirstain/pickapic_v2 --repo-type dataset" in text
    grpo = "\n".join(plan_lines(ROOT / "configs" / "sd3_grpo.yaml", memory=False))
    assert "prompts: data/pickscore_train.txt is Flow-GRPO's PickScore prompt set" in grpo
    assert "dataset/pickscore/train.txt" in grpo
    kto = "\n".join(plan_lines(ROOT / "configs" / "sd15_kto.yaml", memory=False))
    assert "make it with: diffalign pairs-to-labels yuvalkirstain/pickapic_v2 data/pickapic_kto" in kto


def test_every_hub_model_of_the_recipes_has_a_shipped_architecture_to_estimate_on():
    for recipe in RECIPES:
        path = yaml.safe_load((ROOT / "configs" / recipe).read_text())["model"]["path"]
        if tiny_counterpart(recipe) != "lm":
            assert path in SHIPPED_ARCHITECTURES, recipe
    assert all((ASSETS / "models" / folder / "model_index.json").is_file() for folder in SHIPPED_ARCHITECTURES.values())


def test_every_local_path_a_recipe_reads_says_how_to_make_it_here_and_in_the_docs():
    read = set()
    for recipe in RECIPES:
        shipped = yaml.safe_load((ROOT / "configs" / recipe).read_text())
        for path in ((shipped.get("data") or {}).get("path"), (shipped.get("online") or {}).get("prompts")):
            if path and path.startswith("data/"):
                read.add(path)
    assert read == set(LOCAL_DATA)
    page = (ROOT / "docs" / "recipes.md").read_text()
    for path, (what, command) in LOCAL_DATA.items():
        assert f"| `{path}` | {what} | {command} |" in page
    for recipe in RECIPES:  # the index names every recipe, with the command that checks it here
        assert f"`diffalign train configs/{recipe} --smoke`" in page, recipe


@pytest.mark.slow
def test_smoke_on_a_toy_config_shortens_it_and_a_second_smoke_run_starts_afresh(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # a clone's folders, as a user runs it
    for name in ("configs", "assets"):
        (tmp_path / name).symlink_to(ROOT / name)
    for _ in range(2):
        assert main(["train", "configs/toy_diffusion_dpo.yaml", "--smoke"]) == 0
        said = capsys.readouterr().out
        assert "train.max_steps=2  (the size a CPU runs in seconds)" in said and "smoke run passed" in said
    run = tmp_path / "runs/smoke/toy_diffusion_dpo/run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2
    assert load_config(run / "config.yaml").data.path == "toy:pairs"  # the toy data, as shipped


def test_smoke_and_plan_are_one_or_the_other(capsys):
    with pytest.raises(SystemExit):
        main(["train", "configs/sdxl_dpo.yaml", "--smoke", "--plan"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_data_check_reads_the_example_of_every_layout(layout, suffix, tmp_path, capsys):
    path = tmp_path / f"example{suffix}"
    assert main(["data", "example", layout, str(path)]) == 0
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    rows = 8 if layout == "text_unpaired" else 4
    assert f"{path}: {rows} rows, layout {layout} ({LAYOUTS[layout]})" in out
    assert f"read every row: {rows} usable, 0 bad" in out and "an example, as a run reads it:" in out
    if suffix == ".jsonl" and not layout.startswith("text_"):  # images as files named relative to the index
        first = json.loads(path.read_text().splitlines()[0])
        image = first.get("jpg_0") or first.get("image") or first["images"][0]
        assert image.startswith("images/") and (tmp_path / image).is_file()


def test_data_check_counts_the_bad_rows_a_run_would_skip_and_says_why(tmp_path, capsys):
    path = pickapic_parquet(tmp_path / "pairs.parquet", 6, corrupt_rows=(1,), nan_rows=(4,))
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "read every row: 4 usable, 2 bad" in out
    assert "bad in column 'jpg_1': 1" in out and "bad in column 'label_0': 1" in out
    assert re.search(r"e\.g\. .*row 1, column 'jpg_1': image cannot be decoded", out)
    assert main(["data", "check", str(path), "--rows", "2"]) == 0
    assert "read the first 2 rows: 1 usable, 1 bad" in capsys.readouterr().out


def test_data_check_reads_as_a_config_would_and_refuses_what_a_run_would(tmp_path, capsys):
    path = write_example("pairs", tmp_path / "pairs.parquet")
    # the config's columns: a caption column the table lacks is the run's own error
    assert main(["data", "check", str(path), "--config", str(ROOT / "configs/toy_diffusion_dpo.yaml"),
                 "data.caption_column=prompt"]) == 2
    assert "has no column 'prompt'" in " ".join(capsys.readouterr().err.split())
    assert main(["data", "check", str(path), "--config", str(ROOT / "configs/toy_diffusion_dpo.yaml")]) == 0
    assert "layout pairs" in capsys.readouterr().out
    assert main(["data", "check", "--config", str(ROOT / "configs/toy_grpo.yaml")]) == 2
    assert "an online method: it reads prompts" in " ".join(capsys.readouterr().err.split())
    assert main(["data", "check", str(path), "train.max_steps=3"]) == 2
    assert "only data.* settings apply" in " ".join(capsys.readouterr().err.split())


def test_data_check_names_the_layouts_when_the_columns_fit_none(tmp_path, capsys):
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "a", "picture": "b.png"}) + "\n")
    assert main(["data", "check", str(tmp_path / "odd.jsonl")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the columns picture, text are no layout diffalign reads by default" in err and "pairs: jpg_0, jpg_1" in err


TOY_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                     if is_toy(p) and p.name != "toy_generate_ranked.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", TOY_CONFIGS)
def test_the_plan_of_every_toy_config_reads_its_toy_data_and_estimates_its_memory(name, small_toy_datasets,
                                                                                  monkeypatch):
    """The toy configs as shipped, from the repository's root (their smoke runs, toy_size_overrides, are what
    tests/test_toy_configs.py trains). The online ones' plans leave memory out: an online estimate samples a round
    (seconds on fake tensors), which the recipes' plans above and tests/test_bench_memory.py cover."""
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / name)
    objective = OBJECTIVES[config.objective.name]
    online = objective.dataset == "online" and objective.family != "lm"
    text = "\n".join(plan_lines(f"configs/{name}", memory=not online))
    assert f"model: {config.model.path} (on this machine:" in text
    if objective.dataset == "online" and not getattr(objective, "real_data", False):
        assert re.search(r"prompts: \S+: [\d,]+ prompts", text)
    else:
        assert re.search(r"data: (toy|sign):\w+: [\d,]+ rows, layout", text) and " 0 bad" in text
    if objective.family == "lm":
        assert "memory: not estimated for language models" in text
    elif online:
        assert "memory:" not in text
    else:
        assert re.search(r"memory: peak per GPU about \d+\.\d GiB", text)
