"""The LM loops on the round driver (online DPO, SPPO, DNO, INPO): pair rules by hand, the first step's loss by
hand, rounds written and read back, pi_t moving each round, exact resume, and the toy preference rising."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffalign.errors import UserError
from diffalign.losses.self_play import win_rates
from diffalign.objectives import OBJECTIVES
from diffalign.paths import CONFIGS
from diffalign.toy.text_model import TOY_LM
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

SMALL = ["online.groups_per_round=6", "online.steps_per_round=2", "train.batch_size=4", "train.max_steps=4",
         "train.checkpoint_every=2", "train.log_every=1", "train.report_to=none"]


def logged(run, key="loss"):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_pair_rules_by_hand():
    rewards = torch.tensor([[0.2, 1.0, -0.6, 0.2], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.6, 0.6, -0.2]])
    online = OBJECTIVES["lm_online_dpo"](ObjectiveConfig(loss="dpo"))
    groups, items, inputs = online.pairs(rewards, None)
    assert groups.tolist() == [0, 2] and items.tolist() == [[1, 2], [1, 0]] and inputs == {}  # a flat group: none
    dno = OBJECTIVES["lm_dno"](ObjectiveConfig(loss="dpo", options={"min_reward_gap": 1.5}))
    groups, items, _ = dno.pairs(rewards, None)
    assert groups.tolist() == [0, 2]  # gaps 1.6, 0, 1.6: the flat group fails the gap
    sppo = OBJECTIVES["lm_sppo"](ObjectiveConfig(loss="sppo"))
    groups, items, inputs = sppo.pairs(rewards, None)
    by_hand = torch.sigmoid(rewards[0, 1] - rewards[0]).mean()  # best of group 0 against each of the group
    assert inputs["win_chosen"][0] == pytest.approx(float(by_hand))
    assert torch.equal(inputs["win_rejected"], win_rates(rewards).gather(1, items)[:, 1])


@pytest.mark.parametrize("name,loss,first", [
    ("lm_online_dpo", "dpo", math.log(2)),  # policy = base at step 1
    ("lm_dno", "dpo", math.log(2)),  # policy = pi_0
    ("lm_inpo", "inpo_nash", 0.25),  # h = 0 at step 1: (0 - 1 / (2 beta))^2 with beta 1
])
def test_the_first_steps_loss_by_hand(tmp_path, name, loss, first):
    config = load_config(None, [f"model.path={TOY_LM}", f"objective.name={name}", f"objective.loss={loss}",
                                "objective.beta=1.0", "objective.options.max_new_tokens=12", "online.prompts=toy_text_train",
                                "online.reward=toy_text_preference", "train.learning_rate=1e-3",
                                f"output_dir={tmp_path / 'run'}", *SMALL])
    train(config)
    losses = logged(tmp_path / "run")
    assert losses[0] == pytest.approx(first, abs=1e-5)
    record = json.loads((tmp_path / "run" / "rounds" / "round-00000" / "groups.json").read_text())
    assert len(record["prompts"]) == 6 and all(len(c) == record["group_size"] for c in record["completions"])
    assert record["group_size"] == OBJECTIVES[name].group_size  # 4, and the SPPO and DNO authors' 5
    assert (tmp_path / "run" / "rounds" / "round-00001" / "groups.json").is_file()  # steps 2-3: the second round


def test_sppo_on_an_lm_resumes_exactly_across_rounds(tmp_path):
    common = [f"model.path={TOY_LM}", "objective.name=lm_sppo", "objective.loss=sppo", "objective.beta=0.1",
              "objective.options.max_new_tokens=12", "online.prompts=toy_text_train", "online.reward=toy_text_preference",
              "train.learning_rate=1e-3", *SMALL]
    train(load_config(None, [*common, "train.max_steps=6", f"output_dir={tmp_path / 'straight'}"]))
    train(load_config(None, [*common, "train.max_steps=2", f"output_dir={tmp_path / 'split'}"]))
    train(load_config(None, [*common, "train.max_steps=6", "train.resume=latest", f"output_dir={tmp_path / 'split'}"]))
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert logged(tmp_path / "straight", "round") == [0, 0, 1, 1, 2, 2]
    for r in range(3):  # each round sampled by the policy as it then was: the same text after the resume
        paths = [tmp_path / run / "rounds" / f"round-{r:05d}" / "groups.json" for run in ("straight", "split")]
        assert paths[0].read_text() == paths[1].read_text()
    first, second = (json.loads((tmp_path / "straight" / "rounds" / f"round-0000{r}" / "groups.json").read_text())
                     for r in (0, 1))
    assert first["completions"] != second["completions"]  # pi_1 is not pi_0


def test_an_lm_loop_needs_a_text_reward(tmp_path):
    with pytest.raises(UserError, match="text reward"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", ["online.reward=toy_preference"])
    with pytest.raises(UserError, match="online.prompts"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", ["online.prompts="])


def test_an_lm_loop_trains_the_same_losses_on_packed_rounds(tmp_path):
    """data.packing reaches the round driver's batches (scored through the packed rows and their block mask): the same
    per-step losses, to float rounding, and never more padding."""
    common = [f"model.path={TOY_LM}", "objective.name=lm_online_dpo", "objective.loss=ipo", "objective.beta=1.0",
              "objective.options.max_new_tokens=12", "online.prompts=toy_text_train", "online.reward=toy_text_preference",
              "train.learning_rate=1e-3", *SMALL]
    for name, packing in (("padded", "false"), ("packed", "true")):
        train(load_config(None, [*common, f"data.packing={packing}", f"output_dir={tmp_path / name}"]))
    for a, b in zip(logged(tmp_path / "padded"), logged(tmp_path / "packed")):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert all(p <= q for p, q in zip(logged(tmp_path / "packed", "padding_share"),
                                      logged(tmp_path / "padded", "padding_share")))
