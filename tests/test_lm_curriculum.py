"""Curry-DPO on LM pairs: each epoch reads the pairs from the largest reward gap down, and every
refresh_reference_every steps the policy becomes its own reference (DPO's loss is log 2 again at each stage's first
step), across a resume too."""

from __future__ import annotations

import math

import pytest
from lm_helpers import lm_config, logged, text_pairs

from diffalign.data.order import CurriculumOrder
from diffalign.data.text import TextPairDataset
from diffalign.errors import UserError
from diffalign.paths import CONFIGS
from diffalign.train import load_config, train

GAPS = [0.5, 2.0, 0.1, 1.0, 3.0, 0.2]
CURRY = ["data.reward_columns=[score_chosen, score_rejected]", "data.curriculum=score_gap"]


def scored_pairs(tmp_path):
    return text_pairs(tmp_path / "pairs.parquet", n=6, score_chosen=[1.0 + g for g in GAPS], score_rejected=[1.0] * 6)


def test_text_pairs_are_read_from_the_largest_reward_gap_down(tmp_path):
    dataset = TextPairDataset(scored_pairs(tmp_path), tokenizer=None, reward_columns=("score_chosen", "score_rejected"))
    assert dataset.ease() == pytest.approx(GAPS)
    order = CurriculumOrder(dataset.ease(), seed=0)
    assert [order[k] for k in range(6)] == [4, 1, 3, 0, 5, 2]  # gaps 3, 2, 1, 0.5, 0.2, 0.1
    assert [order[6 + k] for k in range(6)] == [4, 1, 3, 0, 5, 2]  # every epoch again


def test_each_stage_starts_from_its_own_reference_and_resumes_exactly(tmp_path):
    data = scored_pairs(tmp_path)
    common = [*CURRY, "objective.options.refresh_reference_every=2", "train.batch_size=2", "train.max_steps=6",
              "train.checkpoint_every=3"]  # the split falls inside a stage: its reference comes from the checkpoint
    train(lm_config(tmp_path, data, *common, name="straight"))
    losses = logged(tmp_path / "straight")
    assert [losses[i] for i in (0, 2, 4)] == pytest.approx([math.log(2)] * 3, abs=1e-6)  # policy = its stage's start
    assert all(loss != pytest.approx(math.log(2), abs=1e-4) for loss in (losses[1], losses[3], losses[5]))
    train(lm_config(tmp_path, data, *common, "train.max_steps=3", name="split"))
    train(lm_config(tmp_path, data, *common, "train.resume=latest", name="split"))
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")


def test_the_curriculum_needs_reward_columns_and_a_refresh_no_other_reference(tmp_path):
    with pytest.raises(UserError, match="reward_columns"):
        load_config(CONFIGS / "toy_lm_dpo.yaml", ["data.curriculum=score_gap"])
    with pytest.raises(UserError, match="refresh_reference_every"):
        load_config(CONFIGS / "toy_lm_dpo.yaml", ["objective.options.refresh_reference_every=10",
                                                  "model.reference=assets/models/toy-lm"])
