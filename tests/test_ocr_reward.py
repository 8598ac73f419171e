"""The OCR reward: Flow-GRPO's rule by hand, and the real PP-OCRv4 model (shipped in rapidocr's wheel) reading
signs rendered with a font."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from diffalign.errors import UserError
from diffalign.rewards import load_reward
from diffalign.rewards.ocr import levenshtein, ocr_score, quoted_text
from diffalign.toy.sign_world import BOARDS, HELDOUT_WORDS, TRAIN_WORDS, Sign, prompts, random_sign, render_sign, \
    sign_prompt


def as_images(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_levenshtein_counts_insertions_deletions_and_substitutions():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "cat") == 3
    assert levenshtein("cat", "") == 3
    assert levenshtein("cat", "cat") == 0
    assert levenshtein("cat", "act") == 2


def test_the_score_is_flow_grpo_s_rule_written_out_by_hand():
    assert ocr_score("CAT", "cat") == 1.0  # case is ignored
    assert ocr_score("C A T", "cat") == 1.0  # spaces are removed
    assert ocr_score("the cat sat", "cat") == 1.0  # the target inside the reading costs nothing
    assert ocr_score("car", "cat") == pytest.approx(1 - 1 / 3)  # one substitution in three letters
    assert ocr_score("ca", "cat") == pytest.approx(1 - 1 / 3)
    assert ocr_score("", "cat") == 0.0  # nothing read
    assert ocr_score("xxxxxxxxxx", "cat") == 0.0  # the distance is capped at the target's length
    assert ocr_score("hello wrld", "Hello World") == pytest.approx(1 - 1 / 10)


def test_the_target_is_the_text_between_the_first_two_quotes():
    assert quoted_text('a sign that says "CAT"') == "CAT"
    assert quoted_text('New York with "Hello World" in fireworks, "not this"') == "Hello World"
    with pytest.raises(UserError, match="quotes no text"):
        quoted_text("a sign with no words")


def test_the_sign_world_splits_its_words_and_its_prompts_quote_them():
    assert not set(TRAIN_WORDS) & set(HELDOUT_WORDS)
    assert prompts("heldout") == [f'a sign that says "{w}"' for w in HELDOUT_WORDS]
    assert len(prompts("all")) == len(TRAIN_WORDS) + len(HELDOUT_WORDS)
    assert all(quoted_text(p) in TRAIN_WORDS for p in prompts("train"))
    sign = random_sign(random.Random(0))
    assert np.array_equal(render_sign(sign), render_sign(sign))  # rendering depends only on the sign


@pytest.fixture(scope="module")
def ocr():
    return load_reward("ocr")


def test_the_real_ocr_model_reads_rendered_words(ocr):
    rng = random.Random(0)
    signs = [random_sign(rng, word) for word in ("CAT", "FOX", "SKY", "TEA")]
    right = ocr(as_images([render_sign(s) for s in signs]), [s.caption for s in signs])
    assert right.min() >= 0.9, right
    wrong = ocr(as_images([render_sign(s) for s in signs]), [sign_prompt(w) for w in ("DOG", "BOX", "ELK", "NUT")])
    assert (wrong < right).all(), wrong
    blank = Sign("", BOARDS[0], (0, 0, 0), 12, 0, 0)
    assert ocr(as_images([render_sign(blank)]), [sign_prompt("CAT")]).tolist() == [0.0]


def test_a_faster_detection_side_reads_the_sign_world_as_well(ocr):
    rng = random.Random(1)
    signs = [random_sign(rng) for _ in range(8)]
    images = as_images([render_sign(s) for s in signs])
    fast = load_reward("ocr:detect_side=160")
    assert fast.detect_side == 160
    assert fast.read(images) == ocr.read(images) == [s.word for s in signs]


def test_a_prompt_without_quotes_or_an_unknown_option_is_refused_before_any_reading(ocr):
    with pytest.raises(UserError, match="quotes no text"):
        ocr(torch.zeros(1, 3, 32, 32), ["a sign"])
    with pytest.raises(UserError, match="no option size.*detect_side"):
        load_reward("ocr:size=3")
    with pytest.raises(UserError, match="toy_preference has no option device; it takes no options"):
        load_reward("toy_preference:device=cpu")
