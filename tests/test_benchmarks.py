"""``diffalign eval --benchmark``: the per-task table by hand, the benchmarks' prompt sets and rewards, and the whole
command on the sign world (a real OCR model) and on GenEval with tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import geneval_spec, tiny_geneval_models

from diffalign.cli import main
from diffalign.diffusion import load_pipeline
from diffalign.errors import UserError
from diffalign.eval.benchmarks import BENCHMARKS, benchmark, prompt_tasks, task_scores
from diffalign.eval.prompts import read_prompts
from diffalign.paths import ASSETS, TOY_SIGN

TINY_SD15 = ASSETS / "models" / "tiny-sd15"


def test_each_task_s_score_is_its_images_mean_and_overall_the_mean_over_tasks_as_geneval_sums_up():
    prompts = ["a", "b", "c"]
    images = ["a", "a", "b", "b", "c", "c"]  # two images a prompt
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    table = task_scores(images, scores, ["counting", "counting", "position"], prompts)
    assert table == {"counting": 0.75, "position": 0.0, "overall": 0.375}  # tasks weigh equally, not images
    assert task_scores(images, scores, None, prompts) == {"overall": 0.5}  # no tasks: the mean over images


def test_the_benchmarks_read_their_shipped_prompts_and_tasks():
    assert len(read_prompts(BENCHMARKS["ocr"].prompts)) == 1018  # Flow-GRPO's dataset/ocr/test.txt
    assert all(p.count('"') >= 2 for p in read_prompts("ocr_test"))  # each quotes the text to render
    geneval = read_prompts("geneval")
    tasks = prompt_tasks("geneval", geneval)
    assert tasks[0] == "single_object" and set(tasks) == {"single_object", "two_object", "counting", "colors",
                                                          "position", "color_attr"}
    assert prompt_tasks("sign_heldout", read_prompts("sign_heldout")) is None


def test_a_benchmark_needs_its_reward_and_geneval_s_official_rule():
    with pytest.raises(UserError, match="unknown benchmark 'parti'; the benchmarks are geneval, ocr, signs, drawbench"):
        benchmark("parti")
    with pytest.raises(UserError, match="needs: add --rewards geneval:DIR:clip=FILE"):
        BENCHMARKS["geneval"].spec(None)
    with pytest.raises(UserError, match="scored by the geneval reward; --rewards names none"):
        BENCHMARKS["geneval"].spec(["ocr"])
    with pytest.raises(UserError, match="drop rule=... from the geneval reward"):
        BENCHMARKS["geneval"].spec(["geneval:/models/m2f:clip=/models/clip.pt:rule=partial"])
    assert BENCHMARKS["ocr"].spec(None) == ["ocr"]
    assert BENCHMARKS["geneval"].spec(["http://gpu2:8400"]) == ["http://gpu2:8400"]  # a served reward may be it
    with pytest.raises(UserError, match="scores with the reward models you give, a column each: add --rewards"):
        BENCHMARKS["drawbench"].spec(None)
    assert BENCHMARKS["drawbench"].spec(["pickscore:/m/ps", "aesthetic:/m/a.pth:clip=/m/c.pt"]) == [
        "pickscore:/m/ps", "aesthetic:/m/a.pth:clip=/m/c.pt"]  # any rewards: each its column


def test_eval_without_prompts_or_a_benchmark_says_what_it_needs(capsys):
    assert main(["eval", "--base", str(TOY_SIGN), "--out", "unused"]) == 2
    assert "needs --prompts (a prompt file or shipped set), or --benchmark NAME" in capsys.readouterr().err
    assert main(["eval", "--base", str(TOY_SIGN), "--benchmark", "drawbench", "--rewards", "jpeg_compressibility",
                 "--out", "unused"]) == 2
    assert "DrawBench's prompts are not shipped (their licence is not stated)" in " ".join(capsys.readouterr().err.split())


def test_the_drawbench_table_is_each_reward_s_mean_on_a_prompt_file_in_its_layout(tmp_path, capsys):
    prompts = tmp_path / "drawbench.csv"  # DrawBench's sheet exported: Prompts, Category
    prompts.write_text('Prompts,Category\n"A red colored car.",Colors\n"A black colored banana.",Colors\n')
    load_pipeline(TINY_SD15, random_init=True).save_pretrained(tmp_path / "tiny-sd15")
    assert main(["eval", "--base", str(tmp_path / "tiny-sd15"), "--benchmark", "drawbench", "--prompts", str(prompts),
                 "--rewards", "jpeg_compressibility,jpeg_incompressibility", "--seeds", "2", "--steps", "2",
                 "--resolution", "64", "--out", str(tmp_path / "out"), "--save-images"]) == 0
    table = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert list(table["base"]) == ["jpeg_compressibility", "jpeg_incompressibility"]
    # each column is its reward's mean over the 4 images, read back from the images the run saved
    from diffalign.rewards import load_reward
    from PIL import Image
    import numpy as np

    files = sorted((tmp_path / "out" / "images" / "base").glob("*.png"))
    assert len(files) == 4
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()) for f in files])
    scores = load_reward("jpeg_incompressibility")(pixels.permute(0, 3, 1, 2).float() / 255, ["x"] * 4)
    assert table["base"]["jpeg_incompressibility"] == pytest.approx(scores.mean().item(), rel=1e-5)
    assert table["base"]["jpeg_compressibility"] == pytest.approx(-table["base"]["jpeg_incompressibility"])
    assert "drawbench benchmark: each reward's mean, 2 image(s) a prompt" in capsys.readouterr().out


@pytest.mark.slow
def test_the_signs_benchmark_prints_the_ocr_table_of_base_and_aligned(tmp_path, capsys):
    out = tmp_path / "bench"
    # overrides what a CPU test cannot afford: one image a word, 8 sampler steps, OCR detection at 160 px
    assert main(["eval", "--base", str(TOY_SIGN), "--aligned", f"same={TOY_SIGN}", "--benchmark", "signs",
                 "--rewards", "ocr:detect_side=160", "--seeds", "1", "--steps", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "benchmark.json").read_text())
    assert list(table) == ["base", "same"] and table["base"] == table["same"]  # the same model at the same seeds
    assert 0 < table["base"]["overall"] <= 1
    assert "signs benchmark: ocr per task, 1 image(s) a prompt" in printed
    assert f"| base | {table['base']['overall']:.3f} |" in printed
    from browser import chromium

    browser = chromium()  # the per-task table as a reader sees it, in the report's own page
    try:
        browser.get((out / "report.html").as_uri())
        heading = browser.find_element("xpath", "//h2[starts-with(., 'signs benchmark')]")
        shown = heading.is_displayed()
        rows = browser.execute_script("return [...arguments[0].nextElementSibling.rows].map(r => r.innerText)", heading)
    finally:
        browser.quit()
    assert shown
    assert rows[0].split() == ["model", "overall"]
    assert rows[1].split() == ["base", f"{table['base']['overall']:.3f}"]
    assert rows[2].split() == ["same", f"{table['same']['overall']:.3f}"]


@pytest.mark.slow
def test_the_geneval_benchmark_prints_each_task_on_tiny_models(tmp_path, capsys):
    metadata = tmp_path / "geneval_small.jsonl"  # three prompts in GenEval's layout, two tasks
    metadata.write_text("".join(json.dumps(row) + "\n" for row in (
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
        {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
         "prompt": "a photo of a dog and a cat"})))
    spec = geneval_spec(*tiny_geneval_models(tmp_path), metadata=metadata)
    load_pipeline(TINY_SD15, random_init=True).save_pretrained(tmp_path / "tiny-sd15")  # a model eval can load
    assert main(["eval", "--base", str(tmp_path / "tiny-sd15"), "--benchmark", "geneval", "--prompts", str(metadata),
                 "--rewards", spec, "--seeds", "2", "--steps", "2", "--resolution", "64", "--out",
                 str(tmp_path / "out")]) == 0
    table = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    # the tiny detector sees dogs in every image and nothing else: the dog right, the bench and the cat missing
    assert table == {"base": {"single_object": 0.5, "two_object": 0.0, "overall": 0.25}}
    assert "| base | 0.500 | 0.000 | 0.250 |" in capsys.readouterr().out
