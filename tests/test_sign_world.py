"""The sign world (the text-rendering toy world): its shipped base spells the held-out words imperfectly, as the real
OCR model reads them, and its OCR-ranked pairs put the better-spelled image first."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.sampling import generate
from diffalign.paths import TOY_SIGN
from diffalign.rewards import load_reward
from diffalign.synth.sign_pairs import sign_dataset
from diffalign.toy.sign_world import prompts

pytestmark = pytest.mark.slow


def test_the_shipped_sign_base_spells_some_held_out_words_and_misspells_others():
    """What alignment starts from: neither blank nor already perfect (the docs' table gives the measured figures)."""
    heldout = prompts("heldout")
    images = generate(load_pipeline(TOY_SIGN), heldout * 2, list(range(2 * len(heldout))), steps=20,
                      guidance_scale=5.0)
    scores = load_reward("ocr:detect_side=160")(images, heldout * 2)
    assert 0.2 < float(scores.mean()) < 0.95, scores
    assert (scores == 1).any() and (scores < 1).any(), scores


def test_the_sign_pairs_are_ranked_by_the_ocr_reward(small_toy_datasets):
    pairs = pq.read_table(sign_dataset("sign:pairs")).to_pydict()
    assert len(pairs["caption"]) > 0 and set(pairs["caption"]) <= set(prompts("train"))
    assert all(s0 > s1 for s0, s1 in zip(pairs["score_0"], pairs["score_1"]))  # the better spelled first
    assert all(0 <= s <= 1 for s in pairs["score_0"] + pairs["score_1"])
