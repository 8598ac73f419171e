"""The toy text world end to end: `diffalign demo --lm` as shipped (it must beat the base with the judge held),
its report in a browser, `diffalign eval` on language models, the toy LM script's determinism, and the toy
world's preference and judge by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.paths import ROOT
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM

# every test here runs a whole demo (minutes on 2 cores), or reads one that ran
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-lm") / "demo"
    assert main(["demo", "--lm", "--out", str(out)]) == 0  # as shipped: no overrides
    return out


def test_the_toy_preference_and_judge_by_hand():
    prompt = "describe the red fox :"
    assert tw.preference_score(" the red fox is joyful and runs slowly .") == 1.0
    assert tw.preference_score(" the red fox is sad and runs slowly .") == -0.6
    assert tw.preference_score(" the red fox runs") == 0.0  # no mood word
    assert tw.judge_score(" the red fox is sad and runs slowly .", prompt) == 1.0
    assert tw.judge_score(" the blue fox is sad and runs slowly .", prompt) == 0.5  # grammatical, other colour
    assert tw.judge_score(" the red fox is is sad and runs slowly .", prompt) == 0.0  # a repeated word
    assert tw.judge_score(" the red fox is sad and runs .", prompt) == 0.0  # a dropped word
    assert len(tw.prompts("train")) + len(tw.prompts("heldout")) == len(tw.prompts("all")) == 36


def test_the_lm_demo_aligns_the_toy_lm_and_holds_the_judge(demo):
    metrics = json.loads((demo / "metrics.json").read_text())
    assert metrics["win_rate"] >= 0.65 and metrics["win_rate_95ci"][0] > 0.5
    assert metrics["reward_aligned"] > metrics["reward_base"] + 0.3
    assert metrics["judge_aligned"] >= metrics["judge_base"] - 0.05  # measured: 0.802 -> 0.780
    assert metrics["seconds"] < 300
    for name in ("reward_margin.png", "report.html", "eval/samples.jsonl", "run/final/model.safetensors"):
        assert (demo / name).stat().st_size > 0
    samples = [json.loads(line) for line in (demo / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"base", "aligned"} and len(samples) == 2 * 64 * len(tw.HELDOUT)
    assert all(s["prompt"] in tw.prompts("heldout") for s in samples)


def test_the_lm_report_reads_in_a_browser(demo):
    from browser import chromium

    browser = chromium()
    try:
        browser.get((demo / "report.html").as_uri())
        rows = browser.execute_script("""return [...document.querySelectorAll('table')].slice(-1)[0].rows.length""")
        summary = browser.execute_script("""return [...document.querySelectorAll('table.summary tr')].map(
            r => [...r.cells].map(c => c.innerText))""")
        figure = browser.execute_script("""const i = document.querySelector('figure img');
            return [i.naturalWidth, i.getBoundingClientRect().width]""")
        text = browser.find_element("tag name", "body").text
        heading, verdict = browser.execute_script("""const h = document.querySelector('h1');
            return [h.innerText, h.nextElementSibling.innerText]""")
    finally:
        browser.quit()
    assert heading == "diffalign demo --lm: RPO on the toy text world"  # the loss configs/toy_lm_dpo.yaml trains
    assert verdict.startswith("aligned beats base on toy_text_preference: it wins ") and "toy_text_judge" in verdict
    assert rows == 1 + len(tw.HELDOUT)  # a header and a row per held-out prompt
    assert [r[0] for r in summary] == ["model", "base", "aligned"]
    assert figure[0] > 100 and figure[1] > 100
    assert "valence of the completion's mood word" in text and "grammatical sentence" in text
    assert "describe the red owl :" in text


def test_eval_compares_language_models(demo, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(TOY_LM), "--aligned", f"dpo={demo / 'run'}", "--prompts", "toy_text_heldout",
                 "--seeds", "4", "--max-new-tokens", "12", "--out", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == {"base", "dpo"}
    assert 0.0 <= summary["dpo"]["toy_text_judge_low"] <= summary["dpo"]["toy_text_judge"] <= 1.0
    assert (out / "report.html").is_file()


def test_the_toy_lm_script_is_deterministic(tmp_path):
    """The script's first steps on two runs give the same weights (the shipped ones are its 1500-step result)."""
    runs = [subprocess.Popen([sys.executable, str(ROOT / "scripts/train_toy_lm.py"), "--steps", "3", "--out",
                              str(tmp_path / name)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
            for name in ("a", "b")]  # at once: each is mostly its start-up, on one core
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert load_file(TOY_LM / "model.safetensors").keys() == a.keys()


def test_a_sequence_classifier_scores_completions_as_a_text_reward(tmp_path):
    """``classifier:PATH``: a local transformers sequence classifier (here the toy LM's architecture with a
    2-label head) scores prompt + completion; its score is the second logit minus the first."""
    import torch
    from transformers import GPT2ForSequenceClassification

    from diffalign.rewards.text import load_text_reward
    from diffalign.toy.text_model import toy_lm_config, toy_tokenizer

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(toy_lm_config().__class__(**{**toy_lm_config().to_dict(), "num_labels": 2}))
    model.save_pretrained(str(tmp_path / "rm"))
    toy_tokenizer().save_pretrained(str(tmp_path / "rm"))
    reward = load_text_reward(f"classifier:{tmp_path / 'rm'}")
    prompts, completions = ["describe the red fox :"] * 2, [" the red fox is joyful and runs slowly .", " the red"]
    scores = reward(completions, prompts)
    tokenizer = toy_tokenizer()
    with torch.no_grad():
        one = model.eval()(**tokenizer([prompts[0] + completions[0]], return_tensors="pt")).logits[0]
    assert scores.shape == (2,) and scores[0] == pytest.approx(float(one[1] - one[0]), abs=1e-5)

