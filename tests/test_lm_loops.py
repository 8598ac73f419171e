"""The LM sides of RSO, GPO (with a general preference model), DRIFT and DisCO on the text round driver: each rule
and loss by hand, the round records, gradients pointing the right way, the refusals, and an exact resume."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from diffalign.errors import UserError
from diffalign.lm.loading import load_trained_lm
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.losses.self_play import preference_scores
from diffalign.objectives import OBJECTIVES
from diffalign.objectives.disco import disco_objective
from diffalign.objectives.rso import rejection_pairs
from diffalign.paths import CONFIGS
from diffalign.rewards.general_preference import (GeneralPreferenceModel, GeneralPreferenceReward,
                                                  general_preference_loss, load_general_preference_model,
                                                  preference_score)
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_GPM, TOY_LM, write_toy_lm
from diffalign.train import load_config, train
from diffalign.train.config import ObjectiveConfig

SMALL = ["online.groups_per_round=6", "online.steps_per_round=2", "train.batch_size=4", "train.max_steps=4",
         "train.checkpoint_every=2", "train.log_every=1", "train.report_to=none", "objective.options.max_new_tokens=12"]
REWARDS = torch.tensor([[0.2, 1.0, -0.6, 0.2], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.6, 0.6, -0.2]])


def logged(run, key="loss"):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def groups_of(run, r=0):
    return json.loads((run / "rounds" / f"round-{r:05d}" / "groups.json").read_text())


def test_lm_rso_pairs_by_the_diffusion_loops_rule():
    """beta -> 0 accepts greedily, best first, paired in acceptance order: group 2 accepts its two 0.6s (a flat pair,
    dropped), then -0.2, then -1.0; the flat group 1 gives nothing."""
    rso = OBJECTIVES["lm_rso"](ObjectiveConfig(loss="dpo", options={"rejection_beta": 1e-6, "accepted": 4}))
    generator = lambda g: torch.Generator().manual_seed(g)  # noqa: E731
    groups, items, inputs = rso.pairs(REWARDS, generator)
    assert groups.tolist() == [0, 0, 2] and items.tolist() == [[1, 0], [3, 2], [3, 0]] and inputs == {}
    expected = rejection_pairs(REWARDS, beta=1e-6, accepted=4, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(expected, (groups, items)))
    with pytest.raises(UserError, match="accepted=9"):
        load_config(CONFIGS / "toy_lm_rso.yaml", ["objective.options.accepted=9"])


def test_lm_gpo_pairs_by_preference_scores_from_rewards_and_from_tables():
    gpo = OBJECTIVES["lm_gpo"](ObjectiveConfig(loss="gpo"))
    groups, items, inputs = gpo.pairs(REWARDS, None)
    assert groups.tolist() == [0, 2] and items.tolist() == [[1, 2], [1, 0]]  # the flat group orders nothing
    assert inputs["score_chosen"].tolist() == pytest.approx([1.0 - 0.2, 0.6 - 0.0])  # r - mean(r), Bradley-Terry
    assert inputs["score_rejected"].tolist() == pytest.approx([-0.6 - 0.2, -1.0 - 0.0])
    # a cyclic table (a beats b beats c beats a, d loses to all): no scalar reward gives it
    table = torch.tensor([[[0.0, 0.5, -0.5, 0.3], [-0.5, 0.0, 0.5, 0.3], [0.5, -0.5, 0.0, 0.3], [-0.3, -0.3, -0.3, 0.0]]])
    groups, items, inputs = gpo.pairs(table, None)
    assert items.tolist() == [[0, 3]]  # the three of the cycle tie at 0.3 / 4; d is last
    assert inputs["score_rejected"].tolist() == pytest.approx([-0.9 / 4])


def test_lm_disco_trains_whole_groups_with_a_positive_and_a_negative():
    disco = OBJECTIVES["lm_disco"](ObjectiveConfig(loss="disco"))
    groups, items, inputs = disco.pairs(REWARDS, None)
    assert groups.tolist() == [0, 2] and items.tolist() == [[0, 1, 2, 3]] * 2
    assert inputs["positive"].tolist() == [[False, True, False, False], [False, True, True, False]]


def _pair_batch(tokenizer, prompt, completions):
    return collate([tokenize_group(tokenizer, prompt, completions)], pad_token_id=tokenizer.pad_token_id,
                   max_length=None)


def _mean_token_logps(model, batch):
    """Each row's mean completion-token log-prob, by hand: log-softmax of the logits at the token before."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    return (logps * mask).sum(1) / mask.sum(1), mask.sum(1)


def test_lm_disco_loss_by_hand_and_its_gradient_raises_the_positive(tmp_path):
    """One group of 3 (one positive): the loss is -(s+ - tau log mean exp(s-/tau)) + the KL hinge, s the mean token
    log-probs; an SGD step on it raises the positive's score and lowers the negatives' soft maximum."""
    model, tokenizer = load_trained_lm(TOY_LM)
    model.train()
    prompt = tw.prompt("red", "fox")
    completions = [" " + tw.sentence("red", "fox", mood, "runs", "slowly") for mood in ("joyful", "angry", "sad")]
    batch = _pair_batch(tokenizer, prompt, completions)
    disco = OBJECTIVES["lm_disco"](ObjectiveConfig(loss="disco", options={"tau": 2.0, "kl_beta": 10.0,
                                                                          "kl_delta": 0.0}))
    old = load_trained_lm(TOY_LM)[0]
    with torch.no_grad():  # pi_t a little away from the policy, so the KL term is not zero
        for p in old.parameters():
            p.add_(0.01 * torch.randn_like(p))
    disco.previous_round = lambda: old
    disco.optimizer_steps, disco.steps_per_round = 0, 1
    positive = torch.tensor([[True, False, False]])
    loss, metrics = disco(model, None, {"inputs": batch, "list_size": 3, "targets": {"positive": positive}})
    s, lengths = _mean_token_logps(model, batch)
    s_old, _ = _mean_token_logps(old, batch)
    kl = ((s_old - s) * lengths).sum() / lengths.sum()
    j = s[0] - 2.0 * torch.log(torch.exp(s[1:] / 2.0).mean())
    assert float(loss) == pytest.approx(float(-j + 10.0 * kl.clamp(min=0) * kl), abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(float(kl), abs=1e-7)
    assert disco_objective(s.detach()[None], positive, 2.0)[0] == pytest.approx(float(j), abs=1e-6)
    disco.kl_beta = 0.0  # the direction of the discriminative term alone
    loss, _ = disco(model, None, {"inputs": batch, "list_size": 3, "targets": {"positive": positive}})
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1e-2 * p.grad)
        after, _ = _mean_token_logps(model, batch)
    assert after[0] > s[0] and torch.logsumexp(after[1:] / 2, 0) < torch.logsumexp(s[1:].detach() / 2, 0)


def test_general_preference_scores_by_hand(tmp_path):
    """s(a, b) = sum_i l_i (a[2i] b[2i+1] - a[2i+1] b[2i]) from unit embeddings and softmax block weights: skew-symmetric,
    and the loss -log sigma(s / tau) of the authors' HighDimGeneralPreferenceLoss."""
    torch.manual_seed(0)
    folder = write_toy_lm(tmp_path / "lm")
    model = GeneralPreferenceModel(AutoModel.from_pretrained(str(folder)), dim=4, prompt_gate=True, tau=0.1)
    tokenizer = load_trained_lm(folder)[1]
    model.save(tmp_path / "gpm", tokenizer)
    reward = GeneralPreferenceReward(tmp_path / "gpm")
    prompt = tw.prompt("red", "fox")
    group = [" " + tw.sentence("red", "fox", mood, "runs", "slowly") for mood in ("joyful", "angry", "calm")]
    table = reward.tables([group], [prompt])[0]
    assert torch.allclose(table, -table.T) and torch.all(table.diagonal() == 0)
    loaded, _ = load_general_preference_model(tmp_path / "gpm")
    batch = _pair_batch(tokenizer, prompt, group)
    with torch.no_grad():
        hidden = loaded.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1
        v = F.normalize(hidden[torch.arange(3), last] @ loaded.value_head.weight.T, dim=-1)
        prompt_end = len(tokenize_group(tokenizer, prompt, group).prompt) - 1
        weights = torch.softmax(hidden[0, prompt_end] @ loaded.prompt_head.weight.T, dim=-1)
    by_hand = sum(weights[i] * (v[0, 2 * i] * v[1, 2 * i + 1] - v[0, 2 * i + 1] * v[1, 2 * i]) for i in range(2))
    assert float(table[0, 1]) == pytest.approx(float(by_hand), abs=1e-6)
    assert float(preference_score(v[0], v[1], weights)) == pytest.approx(float(by_hand), abs=1e-6)
    pair = _pair_batch(tokenizer, prompt, group[:2])
    loss, accuracy = general_preference_loss(loaded, pair)
    assert float(loss) == pytest.approx(float(-F.logsigmoid(by_hand / 0.1)), abs=1e-5)
    assert float(accuracy) == float(by_hand > 0)


def test_the_shipped_toy_gpm_prefers_the_happier_mood():
    reward = GeneralPreferenceReward(TOY_GPM)
    group = [" " + tw.sentence("red", "fox", mood, "runs", "slowly") for mood in ("joyful", "calm", "angry")]
    table = reward.tables([group], [tw.prompt("red", "fox")])[0]
    assert table[0, 1] > 0 and table[1, 2] > 0 and table[0, 2] > 0
    assert preference_scores(table[None]).argsort().tolist() == [[2, 1, 0]]


def test_lm_gpo_with_a_general_preference_model_records_tables_and_starts_at_its_formula(tmp_path):
    """Round 0's tables are the model's; step 1's loss (policy = pi_0, log-ratios 0) is the mean over the batch of
    ((s_w / beta)^2 + (s_l / beta)^2) / 2, whatever pairs the batch drew, so it lies within the round's range."""
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_gpo_gpm.yaml", [f"output_dir={run}", "objective.beta=1.0", *SMALL]))
    record = groups_of(run)
    tables = torch.tensor(record["preferences"])
    assert tables.shape == (6, 4, 4) and torch.allclose(tables, -tables.transpose(1, 2))
    reward = GeneralPreferenceReward(TOY_GPM)
    assert torch.allclose(reward.tables(record["completions"], record["prompts"]), tables, atol=1e-6)
    scores = preference_scores(tables)
    per_group = (scores.amax(1) ** 2 + scores.amin(1) ** 2) / 2
    assert float(per_group.min()) - 1e-6 <= logged(run)[0] <= float(per_group.max()) + 1e-6
    assert "train_reward" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_a_general_preference_model_is_refused_where_a_score_per_completion_is_needed(tmp_path, capsys):
    with pytest.raises(UserError, match="lm_gpo"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", [f"online.reward=gpm:{TOY_GPM}"])
    from diffalign.cli import main

    assert main(["eval", "--base", str(TOY_LM), "--prompts", "toy_text_heldout", "--rewards", f"gpm:{TOY_GPM}",
                 "--out", str(tmp_path / "eval")]) != 0
    assert "compares completions" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "eval").exists()
    with pytest.raises(UserError, match="no general preference model"):
        GeneralPreferenceReward(TOY_LM)


def _labelled(path, rows):
    pq.write_table(pa.table({"prompt": [r[0] for r in rows], "completion": [r[1] for r in rows],
                             "label": [r[2] for r in rows]}), path)
    return path


def test_lm_drift_pairs_fresh_completions_over_the_datas_undesirable_ones(tmp_path):
    """Each round: the next undesirable rows (in the run's seeded order), each after pi_t's fresh completion for its
    prompt; desirable and bad rows are never negatives; no reward; step 1's DPO loss is log 2 (policy = pi_0)."""
    prompts = tw.prompts("train")
    rows = [(prompts[i % 4], " " + tw.sentence(*tw.parse_prompt(prompts[i % 4]), "angry", tw.VERBS[i // 4], "slowly"),
             False) for i in range(8)]
    rows += [(prompts[0], " " + tw.sentence(*tw.parse_prompt(prompts[0]), "joyful", "runs", "slowly"), True),
             (prompts[1], "", False)]  # a desirable row, and a bad one (empty completion)
    data = _labelled(tmp_path / "dsat.parquet", rows)
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_drift.yaml", [f"output_dir={run}", f"data.path={data}",
                                                      "objective.loss=dpo", *SMALL]))
    assert logged(run)[0] == pytest.approx(math.log(2), abs=1e-5)
    negatives = {(p, c) for p, c, label in rows if not label and c}
    seen = []
    for r in (0, 1):
        record = groups_of(run, r)
        assert record["reward"] is None and record["rewards"] is None and len(record["completions"]) == 6
        for prompt, (fresh, dsat) in zip(record["prompts"], record["completions"]):
            assert (prompt, dsat) in negatives and fresh != dsat
            seen.append(dsat)
    assert len(set(seen[:8])) == 8  # the first 8 of two rounds: every negative once before any repeats


def test_lm_drift_needs_its_data_and_no_reward(tmp_path):
    with pytest.raises(UserError, match="data.path"):
        load_config(CONFIGS / "toy_lm_drift.yaml", ["data.path=null"])
    with pytest.raises(UserError, match="no reward"):
        load_config(CONFIGS / "toy_lm_drift.yaml", ["online.reward=toy_text_preference"])
    data = _labelled(tmp_path / "liked.parquet", [(tw.prompts("train")[0], " the red fox is happy .", True)])
    with pytest.raises(UserError, match="no undesirable completion"):
        train(load_config(CONFIGS / "toy_lm_drift.yaml", [f"output_dir={tmp_path / 'run'}", f"data.path={data}",
                                                          *SMALL]))


@pytest.mark.parametrize("config", ["toy_lm_rso.yaml", "toy_lm_disco.yaml"])
def test_the_new_lm_loops_resume_exactly(tmp_path, config):
    common = [*SMALL, "train.max_steps=6"]
    train(load_config(CONFIGS / config, [*common, f"output_dir={tmp_path / 'straight'}"]))
    train(load_config(CONFIGS / config, [*common, "train.max_steps=2", f"output_dir={tmp_path / 'split'}"]))
    train(load_config(CONFIGS / config, [*common, "train.resume=latest", f"output_dir={tmp_path / 'split'}"]))
    assert logged(tmp_path / "split") == logged(tmp_path / "straight")
    assert logged(tmp_path / "straight", "round") == [0, 0, 1, 1, 2, 2]


def test_a_round_with_nothing_to_train_is_refused_with_the_reason(tmp_path):
    """A reward that scores every completion alike leaves DisCO no group with a positive and a negative."""
    from diffalign.rewards import text

    flat = text.TextReward("flat", "every completion 0", lambda completion, prompt: 0.0)
    text.TEXT_REWARDS["flat_for_test"] = lambda: flat
    try:
        with pytest.raises(UserError, match="saturated"):
            train(load_config(CONFIGS / "toy_lm_disco.yaml", [f"output_dir={tmp_path / 'run'}",
                                                              "online.reward=flat_for_test", *SMALL]))
    finally:
        del text.TEXT_REWARDS["flat_for_test"]


def test_online_dpo_pairs_every_two_completions_and_gives_soft_losses_their_strength():
    """pairs=all: every two completions of different reward, the better first; a soft-label loss gets each pair's
    Bradley-Terry strength sigma((r_w - r_l) / T)."""
    online = OBJECTIVES["lm_online_dpo"](ObjectiveConfig(loss="soft_dpo", options={"pairs": "all",
                                                                                  "preference_temperature": 0.5}))
    groups, items, inputs = online.pairs(REWARDS, None)
    # group 0 [0.2, 1.0, -0.6, 0.2]: 5 of its 6 pairs differ; group 1 is flat; group 2 [-1.0, 0.6, 0.6, -0.2]: 5
    assert groups.tolist() == [0] * 5 + [2] * 5
    assert items.tolist()[:5] == [[1, 0], [0, 2], [1, 2], [1, 3], [3, 2]]
    gap = REWARDS[groups, items[:, 0]] - REWARDS[groups, items[:, 1]]
    assert torch.all(gap > 0)
    torch.testing.assert_close(inputs["preference"], torch.sigmoid(gap / 0.5))
    hard = OBJECTIVES["lm_online_dpo"](ObjectiveConfig(loss="dpo"))
    assert hard.pairs(REWARDS, None)[2] == {}  # a pairwise loss takes no strength
    with pytest.raises(UserError, match="soft_dpo is a soft-label loss"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", ["objective.loss=soft_dpo"])
