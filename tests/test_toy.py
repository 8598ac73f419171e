"""The toy world: rendering, the judge, the rewards, prompt sets, statistics and the shipped base model."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from diffalign.errors import UserError
from diffalign.eval.prompts import read_prompts
from diffalign.eval.stats import mean_interval, win_rate
from diffalign.rewards import ToyAdherence, ToyPreference, load_reward
from diffalign.toy import Scene, adheres, measure, preference_score, prompts, random_scene, render
from diffalign.toy.world import BACKGROUND, HELDOUT, SIZE


def test_rendering_is_deterministic_and_draws_the_asked_colour():
    scene = Scene("red", "circle", 8.0, 16.0, 16.0)
    a, b = render(scene), render(scene)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
    assert np.array_equal(a, b)
    assert tuple(a[0, 0]) == BACKGROUND and tuple(a[16, 16]) == (215, 40, 40)


def test_measure_recovers_size_position_colour_and_shape():
    m = measure(render(Scene("blue", "square", 10.0, 16.0, 16.0)))
    side = 2 * 10.0 * 0.886
    assert m.area == pytest.approx(side**2 / SIZE**2, rel=0.08)
    assert m.offset < 0.03 and (m.colour, m.shape) == ("blue", "square")
    corner = measure(render(Scene("green", "triangle", 6.0, 7.0, 8.0)))
    assert (corner.colour, corner.shape) == ("green", "triangle")
    # an equilateral triangle's centroid is its circumcentre (7, 8); pixel i's centre is at i + 0.5,
    # so in pixel indices it sits at (6.5, 7.5) and the image centre at (15.5, 15.5)
    assert corner.offset == pytest.approx(math.hypot(6.5 - 15.5, 7.5 - 15.5) / 16, abs=0.01)


def test_the_judge_agrees_with_the_renderer_on_random_scenes():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(300)]
    agreement = np.mean([adheres(measure(render(s)), s.caption) for s in scenes])
    assert agreement >= 0.97


def test_preference_prefers_large_centred_shapes():
    big_centre = preference_score(measure(render(Scene("red", "circle", 11.0, 16.0, 16.0))))
    small_centre = preference_score(measure(render(Scene("red", "circle", 5.0, 16.0, 16.0))))
    big_corner = preference_score(measure(render(Scene("red", "circle", 11.0, 11.5, 11.5))))
    assert big_centre > small_centre and big_centre > big_corner
    blank = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
    assert preference_score(measure(blank)) == -1.0  # nothing drawn: no size, maximal offset
    right = measure(render(Scene("red", "circle", 5.0, 16.0, 16.0)))
    assert preference_score(right, "a red circle") == preference_score(right)
    assert preference_score(right, "a blue circle") == preference_score(right) - 1.0  # the wrong picture


def test_reward_models_take_float_tensors_and_score_each_image():
    scenes = [Scene("red", "circle", 11.0, 16.0, 16.0), Scene("red", "circle", 5.0, 8.0, 8.0)]
    images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    prompts_ = ["a red circle", "a blue circle"]
    reward = load_reward("toy_preference")(images, prompts_)
    assert reward.shape == (2,) and reward[0] > reward[1] + 1.0  # smaller, off-centre and the wrong colour
    assert ToyAdherence()(images, prompts_).tolist() == [1.0, 0.0]
    assert isinstance(ToyPreference().name, str)
    with pytest.raises(UserError, match="unknown reward"):
        load_reward("pickscroe")


def test_prompt_splits_are_disjoint_and_shipped():
    train, heldout = prompts("train"), prompts("heldout")
    assert not set(train) & set(heldout) and len(train) + len(heldout) == len(prompts("all"))
    assert len(heldout) == len(HELDOUT) and "an orange square" in heldout
    assert read_prompts("toy_heldout") == heldout
    assert read_prompts("toy_train") == train


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"caption": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="toy_heldout"):
        read_prompts(tmp_path / "missing.txt")


def test_win_rate_counts_ties_half_and_has_a_wilson_interval():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.0, 2.0, 5.0, 1.0])
    rate, low, high = win_rate(a, b)
    assert rate == pytest.approx(2.5 / 4)
    # Wilson interval by hand, n = 4, p = 0.625, z = 1.96
    z, n, p = 1.959963984540054, 4, 0.625
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (low, high) == pytest.approx((centre - half, centre + half))
    mean, lo, hi = mean_interval(torch.tensor([1.0, 3.0]))
    assert mean == 2.0 and hi - mean == pytest.approx(1.959963984540054 * math.sqrt(2) / math.sqrt(2))


def test_the_mean_of_a_0_1_score_gets_a_wilson_interval_inside_0_1():
    """toy_adherence is 0 or 1 per image: its normal interval passed 1 ([0.804, 1.030] in a demo report)."""
    values = torch.tensor([1.0] * 23 + [0.0])
    mean, low, high = mean_interval(values)
    z, n, p = 1.959963984540054, 24, 23 / 24
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert mean == pytest.approx(p) and (low, high) == pytest.approx((centre - half, centre + half))
    assert 0.0 <= low < mean < high <= 1.0
    assert mean_interval(torch.ones(8))[2] <= 1.0
