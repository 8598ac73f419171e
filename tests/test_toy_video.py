"""The toy video world: its judge ranks smooth constant-speed motion of the asked shape first, by hand-built clips;
its shipped base (Wan2.1's architecture at toy scale) draws the asked shapes moving every way; its pairs put the
smoother clip first and train; its configs train any video backbone given as model.path."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.diffusion import load_pipeline
from diffalign.diffusion.sampling import generate
from diffalign.errors import UserError
from diffalign.paths import CONFIGS, ROOT, TOY_VIDEO
from diffalign.rewards import load_reward
from diffalign.toy.datasets import toy_dataset
from diffalign.toy.video_judge import MIN_TRAVEL, ROUGHNESS_SCALE, clip_preference_score, measure_clip
from diffalign.toy.video_world import FRAMES, MOTIONS, Clip, prompts, random_clip, render_clip
from diffalign.train import load_config, train


def as_tensor(*clips: Clip) -> torch.Tensor:
    """Rendered clips as the models give them: (N, 3, F, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack([render_clip(c) for c in clips])).permute(0, 4, 1, 2, 3).float() / 255


def straight(colour="red", shape="circle", speeds=(1.5,) * (FRAMES - 1), radius=6.0) -> Clip:
    """A clip moving right from x = 8 by ``speeds`` pixels each frame."""
    xs = np.r_[8.0, 8.0 + np.cumsum(speeds)]
    return Clip(colour, shape, radius, tuple((float(x), 16.0) for x in xs), "by hand")


def test_roughness_is_the_mean_second_difference_of_the_centroid_path():
    steady = measure_clip(render_clip(straight()))
    assert steady.roughness < 0.05 and steady.travel == pytest.approx(12.0, abs=0.1)
    # speeds 1, 2, 1, 2, ...: every second difference is +-1 pixel
    alternating = measure_clip(render_clip(straight(speeds=(1.0, 2.0) * ((FRAMES - 1) // 2))))
    assert alternating.roughness == pytest.approx(1.0, abs=0.05)
    assert clip_preference_score(alternating) == pytest.approx(-alternating.roughness / ROUGHNESS_SCALE)


def test_the_judge_prefers_steady_motion_of_the_asked_shape_over_every_other_kind():
    rng = random.Random(0)
    by_motion = {m: [random_clip(rng, "blue", "square", motion=m) for _ in range(16)] for m in MOTIONS}
    reward = load_reward("toy_video_preference")
    mean = {m: float(reward(as_tensor(*clips), [c.caption for c in clips]).mean()) for m, clips in by_motion.items()}
    assert mean["steady"] > mean["speeding"] > mean["stop_and_go"] > mean["shaky"], mean
    assert mean["steady"] > -0.05 and mean["shaky"] < -0.8, mean
    adherence = load_reward("toy_video_adherence")
    clips = [c for group in by_motion.values() for c in group]
    assert float(adherence(as_tensor(*clips), [c.caption for c in clips]).mean()) > 0.95


def test_the_wrong_colour_a_still_shape_and_a_vanishing_shape_cost_a_clip_1_and_do_not_adhere():
    prompt = ["a red circle moving"]
    reward, adherence = load_reward("toy_video_preference"), load_reward("toy_video_adherence")
    right = as_tensor(straight())
    assert adherence(right, prompt).item() == 1.0
    for wrong in (as_tensor(straight(colour="blue")), as_tensor(straight(speeds=(MIN_TRAVEL / FRAMES,) * (FRAMES - 1)))):
        assert adherence(wrong, prompt).item() == 0.0
        assert reward(wrong, prompt).item() < reward(right, prompt).item() - 0.9
    vanishing = right.clone()
    vanishing[:, :, 4] = 240 / 255  # the background only, in the middle frame
    assert adherence(vanishing, prompt).item() == 0.0 and reward(vanishing, prompt).item() == -2.0


def test_the_wrong_kind_of_shape_does_not_adhere_but_is_left_to_the_adherence_judge_by_the_preference():
    prompt = ["a red circle moving"]
    square = as_tensor(straight(shape="square"))
    assert load_reward("toy_video_adherence")(square, prompt).item() == 0.0
    assert load_reward("toy_video_preference")(square, prompt).item() == pytest.approx(
        load_reward("toy_video_preference")(as_tensor(straight()), prompt).item(), abs=0.02)


def test_the_video_judges_refuse_images_and_other_prompts():
    with pytest.raises(UserError, match="3 frames or more"):
        load_reward("toy_video_preference")(torch.rand(1, 3, 32, 32), ["a red circle moving"])
    with pytest.raises(UserError, match="toy-world prompts"):
        load_reward("toy_video_adherence")(as_tensor(straight()), ["a cat on a sofa"])


def test_the_prompt_splits_are_the_image_worlds_and_shipped():
    from diffalign.eval.prompts import read_prompts
    from diffalign.toy.world import prompts as image_prompts

    assert prompts("heldout") == [f"{p} moving" for p in image_prompts("heldout")]
    assert read_prompts("toy_video_heldout") == prompts("heldout")
    assert read_prompts("toy_video_train") == prompts("train")


@pytest.mark.slow
def test_the_shipped_base_draws_the_asked_shapes_moving_every_way():
    """What alignment starts from: some held-out shapes drawn right and moving, others not (the kind of shape blurs),
    and the right ones moving more and less smoothly (docs/video.md gives the figures on 384 clips)."""
    heldout = prompts("heldout")
    clips = generate(load_pipeline(TOY_VIDEO), heldout * 4, list(range(4 * len(heldout))), steps=20,
                     guidance_scale=5.0, frames=FRAMES, resolution=32)
    assert clips.shape == (4 * len(heldout), 3, FRAMES, 32, 32)
    adherence = load_reward("toy_video_adherence")(clips, heldout * 4)
    scores = load_reward("toy_video_preference")(clips, heldout * 4)
    assert 0.1 < float(adherence.mean()) < 0.9, adherence
    adhering = scores[adherence == 1]
    assert float(adhering.max() - adhering.min()) > 0.1, adhering  # room to prefer the smoother


@pytest.mark.slow
def test_the_video_pairs_put_the_smoother_clip_first_as_clips_the_trainer_reads(small_toy_datasets):
    pairs = pq.read_table(toy_dataset("toy:video_pairs")).to_pydict()
    assert len(pairs["caption"]) > 0 and set(pairs["caption"]) <= set(prompts("train"))
    assert all(s0 > s1 for s0, s1 in zip(pairs["score_0"], pairs["score_1"]))
    with Image.open(io.BytesIO(pairs["jpg_0"][0])) as clip:  # a lossless animated WebP of every frame
        assert clip.format == "WEBP" and clip.n_frames == FRAMES and clip.size == (32, 32)
    ranked = pq.read_table(toy_dataset("toy:video_ranked")).to_pydict()
    assert len(ranked["images"][0]) == len(ranked["scores"][0]) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("config", "backbone"), [
    ("toy_video_dpo.yaml", ["model.path=assets/models/tiny-hunyuanvideo15", "model.random_init=true"]),
    ("toy_video_grpo.yaml", ["model.path=assets/models/tiny-wan22", "model.expert=high", "model.random_init=true",
                             "online.groups_per_round=2", "online.group_size=2", "online.steps_per_round=2",
                             "objective.sample_steps=2"]),
])
def test_the_toy_video_configs_train_any_video_backbone_given_as_model_path(config, backbone, small_toy_datasets,
                                                                            tmp_path, monkeypatch):
    """As their header says: the config's own data, prompts and rewards, another backbone (and a round's size)."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    overrides = [f"output_dir={run}", "train.max_steps=2", "train.batch_size=2", "validation.images_per_prompt=1",
                 "validation.steps=2", *backbone]
    summary = train(load_config(CONFIGS / config, overrides))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(math.isfinite(v) for v in losses)
    assert (run / "final").is_dir()
