"""The embedded default end to end: the shipped toy base model, `diffalign demo` (which must show a
real gain on held-out prompts), `diffalign eval` on its run, and the base-model script's determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.diffusion import load_pipeline
from diffalign.diffusion.sampling import generate
from diffalign.paths import TOY_BASE
from diffalign.rewards import ToyAdherence
from diffalign.toy import prompts

# every test here runs a whole demo (minutes on 2 cores), or reads one that ran
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_base_model_draws_what_it_is_asked():
    pipe = load_pipeline(TOY_BASE)
    asked = [p for p in prompts("all") for _ in range(2)]
    images = generate(pipe, asked, list(range(len(asked))), steps=20, guidance_scale=5.0)
    assert images.shape == (len(asked), 3, 32, 32)
    assert ToyAdherence()(images, asked).mean() >= 0.7  # measured: 0.76 (0.78 on the held-out prompts)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_demo_aligns_the_toy_model_and_writes_the_report(demo):
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["win_rate"] >= 0.65
    assert metrics["reward_aligned"] > metrics["reward_base"]
    assert metrics["adherence_aligned"] >= metrics["adherence_base"] - 0.02
    for name in ("grid.png", "reward_over_steps.png", "report.html"):
        assert (demo / name).stat().st_size > 0
    html = (demo / "report.html").read_text()
    assert "data:image/png;base64," in html and "toy_preference_win_rate" in html


def test_the_report_reads_in_a_browser(demo):
    """The report as a person sees it in Chromium: its verdict first (the trained reward's win rate with its
    interval, and whether adherence held), the trained reward's columns first, labels as text, a card per seed
    under its prompt wrapped to the window's width, every image decoded and shown at 128 px or more with its scores
    under it, each seed's winner framed in green, a sentence per metric, and intervals inside [0, 1] where the
    score is."""
    from browser import chromium

    metrics = json.loads((demo / "eval" / "metrics.json").read_text())
    for row in metrics.values():  # adherence is a 0/1 score: its interval stays in [0, 1]
        assert 0.0 <= row["toy_adherence_low"] <= row["toy_adherence"] <= row["toy_adherence_high"] <= 1.0
    browser = chromium()
    try:
        browser.get((demo / "report.html").as_uri())
        first = browser.execute_script("""const h = document.querySelector('h1').nextElementSibling;
            return [h.className, h.innerText,
                    [...document.querySelectorAll('table.summary tr:first-child th')].map(th => th.innerText)];""")
        sections = browser.execute_script("""return [...document.querySelectorAll('section')].map(s => ({
            prompt: s.querySelector('h3').innerText,
            heads: [...s.querySelectorAll('.seed h4')].map(h => h.innerText),
            rows: new Set([...s.querySelectorAll('.seed')].map(c => c.offsetTop)).size,
            overflows: s.scrollWidth > document.body.clientWidth,
            models: [...s.querySelector('.seed').querySelectorAll('figcaption')].map(f => f.innerText.split(' ')[0]),
            shown: [...s.querySelectorAll('img')].map(i => [i.naturalWidth, i.getBoundingClientRect().width]),
            scores: [...s.querySelectorAll('.seed .score')].map(d => d.innerText),
            won: [...s.querySelectorAll('.seed figure.won')].map(f => [getComputedStyle(f).borderTopWidth,
                                                                      getComputedStyle(f).borderTopColor])}))""")
        text = browser.find_element("tag name", "body").text
    finally:
        browser.quit()
    verdict_class, verdict, columns = first
    row = metrics["aligned"]
    assert verdict_class == "verdict"
    assert verdict.startswith(f"aligned beats base on toy_preference: it wins {row['toy_preference_win_rate']:.1%} of "
                              f"same-seed comparisons (95% interval {row['toy_preference_win_low']:.1%}-")
    assert "toy_adherence held" in verdict
    assert columns[:3] == ["model", "toy_preference", "toy_preference_win_rate"]
    assert [s["prompt"] for s in sections] == prompts("heldout")
    for section in sections:
        assert section["models"] == ["base", "aligned"] and len(section["heads"]) == 16
        assert all(head.startswith("seed ") for head in section["heads"])
        assert section["rows"] > 1 and not section["overflows"]  # 16 seeds wrap; nothing scrolls off the page
        assert len(section["shown"]) == 32 and all(natural == 32 and shown >= 128 for natural, shown in section["shown"])
        assert all("toy_preference" in s and "toy_adherence" in s for s in section["scores"])
        assert 0 < len(section["won"]) <= 16
        assert all(style == ["5px", "rgb(42, 157, 63)"] for style in section["won"])  # a green frame, not a badge only
    assert "larger and more centred" in text and "share of images that do" in text  # what each metric measures
    assert "Step 0 is the base model" in text  # why the curve does not start at the table's base value


def test_eval_compares_a_run_with_its_base_on_a_prompt_file(demo, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(TOY_BASE), "--aligned", f"dpo={demo / 'run'}", "--prompts", "toy_heldout",
                 "--seeds", "2", "--steps", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == {"base", "dpo"}
    assert 0.0 <= summary["dpo"]["toy_preference_win_rate"] <= 1.0
    assert len(list((out / "grids").glob("prompt-*.png"))) == len(prompts("heldout"))


def test_the_demo_and_the_benchmark_start_their_run_folder_over_when_run_again(tmp_path):
    """``train`` refuses an output_dir that holds a run; the demo's (and bench_alignment's) run folder is
    their own, so running them again into the same --out retrains instead of stopping there."""
    from diffalign.demo.image import align_and_compare, sample_candidates, write_pairs
    from diffalign.paths import CONFIGS

    base = load_pipeline(TOY_BASE)
    pairs = write_pairs(sample_candidates(base, prompts("train")[:2], groups_per_prompt=1, candidates=2, seed=0,
                                         steps=2, guidance_scale=5.0), tmp_path / "pairs.parquet")
    quick = ["train.max_steps=2", "train.batch_size=2", "validation.every=0", "train.checkpoint_every=1"]
    for _ in range(2):
        evaluation = align_and_compare(base, pairs, tmp_path / "run", config=CONFIGS / "toy_diffusion_dpo.yaml",
                                       overrides=quick, eval_seeds=1, steps=2, guidance_scale=5.0)
        assert set(evaluation.scores) == {"base", "aligned"}
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # the second run's log alone


def test_base_model_script_is_deterministic(tmp_path):
    """Two runs of the script (at once: each is mostly its start-up, on one core) write the same weights."""
    runs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train_toy_base.py"), "--out", str(tmp_path / name),
                              "--scenes", "64", "--vae-steps", "2", "--unet-steps", "2", "--batch", "4"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for name in ("a", "b")]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read()[-2000:]
    a, b = (load_file(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for base in (tmp_path / "a", TOY_BASE):  # what the script writes, and what is shipped
        _assert_hub_key_layout(base / "text_encoder" / "model.safetensors")


def _assert_hub_key_layout(text_encoder_file: Path) -> None:
    """The text encoder's weights are named as the Hub's CLIP checkpoints name them (``text_model.*``):
    transformers 5.0 reads only those names and would load the toy base's text encoder with random
    weights (seen: held-out adherence 0.06), where later versions read both."""
    keys = load_file(text_encoder_file).keys()
    assert keys and all(key.startswith("text_model.") for key in keys), sorted(keys)[:3]
