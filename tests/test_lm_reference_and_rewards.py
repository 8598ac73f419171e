"""A reference other than the base (model.reference), CDR's density-ratio reward, and the ranking accuracy that
``diffalign eval --pairs`` reports: each by hand on the toy LM, with the refusals."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from lm_helpers import lm_config, logged, text_pairs

from diffalign.cli import main
from diffalign.errors import UserError
from diffalign.lm.loading import load_trained_lm
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.paths import CONFIGS, TOY_BASE
from diffalign.rewards.density_ratio import DensityRatioReward
from diffalign.rewards.text import load_text_reward
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM, write_toy_lm
from diffalign.train import load_config, train


def summed_logps(model, tokenizer, prompt, completions, skip_eos=False):
    """Each completion's summed token log-prob by hand: log-softmax of the logits at the token before."""
    batch = collate([tokenize_group(tokenizer, prompt, completions)], pad_token_id=tokenizer.pad_token_id,
                    max_length=None)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = F.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].bool()
    if skip_eos:
        mask &= batch["input_ids"][:, 1:] != tokenizer.eos_token_id
    return (logps * mask).sum(1), mask.sum(1)


def test_dpo_against_another_reference_starts_at_its_formula(tmp_path):
    """With model.reference a second LM, step 1's loss is -log sigma(beta ((pc - rc) - (pr - rr))), the policy the base
    and rc, rr the other model's log-probs: not log 2, as it is against the base."""
    data = text_pairs(tmp_path / "pairs.parquet", n=1)  # one pair: every batch is it
    other = write_toy_lm(tmp_path / "other", seed=3)
    train(lm_config(tmp_path, data, f"model.reference={other}", "train.max_steps=1"))
    row = pq.read_table(data).to_pylist()[0]
    policy, tokenizer = load_trained_lm(TOY_LM)
    reference, _ = load_trained_lm(other)
    (pc, pr), _ = summed_logps(policy, tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
    (rc, rr), _ = summed_logps(reference, tokenizer, row["prompt"], [row["chosen"], row["rejected"]])
    expected = float(-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))))
    assert logged(tmp_path / "run")[0] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - math.log(2)) > 0.01
    train(lm_config(tmp_path, data, f"model.reference={other}", "train.max_steps=1", "train.lora_rank=4",
                    name="lora"))  # a LoRA run too: the other model, not the base with adapters off
    assert logged(tmp_path / "lora")[0] == pytest.approx(expected, rel=1e-5)


def test_a_reference_is_refused_where_it_cannot_be_used(tmp_path):
    with pytest.raises(UserError, match="pi_t"):
        load_config(CONFIGS / "toy_lm_sppo.yaml", [f"model.reference={TOY_LM}"])
    other = write_toy_lm(tmp_path / "other")
    _, tokenizer = load_trained_lm(other)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(UserError, match="tokenizer is not the policy's"):
        train(lm_config(tmp_path, text_pairs(tmp_path / "pairs.parquet"), f"model.reference={other}"))


def test_the_density_ratio_reward_by_hand(tmp_path):
    """cdr:STRONG:WEAK = sum over the completion's tokens (the EOS left out) of log p_strong - log p_weak; average
    divides by their count."""
    weak = write_toy_lm(tmp_path / "weak", seed=5)
    prompt = tw.prompt("red", "fox")
    completions = [" " + tw.sentence("red", "fox", mood, "runs", "slowly") for mood in ("joyful", "angry")]
    reward = load_text_reward(f"cdr:{TOY_LM}:{weak}")
    strong_model, tokenizer = load_trained_lm(TOY_LM)
    weak_model, _ = load_trained_lm(weak)
    strong, tokens = summed_logps(strong_model, tokenizer, prompt, completions, skip_eos=True)
    by_hand = strong - summed_logps(weak_model, tokenizer, prompt, completions, skip_eos=True)[0]
    assert tokens.tolist() == [9, 9]  # 9 words, no EOS
    torch.testing.assert_close(reward(completions, [prompt] * 2), by_hand, rtol=1e-5, atol=1e-5)
    averaged = load_text_reward(f"cdr:{TOY_LM}:{weak}:average=true")
    torch.testing.assert_close(averaged(completions, [prompt] * 2), by_hand / 9, rtol=1e-5, atol=1e-5)
    for bad in (f"cdr:{TOY_LM}", f"cdr:{TOY_LM}:{weak}:mean=true", f"cdr:{TOY_LM}:{weak}:average=yes"):
        with pytest.raises(UserError, match="cdr:STRONG:WEAK"):
            DensityRatioReward.parse(bad)


def test_an_online_loop_trains_on_the_density_ratio(tmp_path):
    run = tmp_path / "run"
    weak = write_toy_lm(tmp_path / "weak", seed=5)
    train(load_config(CONFIGS / "toy_lm_online_dpo.yaml", [f"online.reward=cdr:{TOY_LM}:{weak}", f"output_dir={run}",
                                                           "online.groups_per_round=4", "train.max_steps=2",
                                                           "train.batch_size=2", "train.report_to=none"]))
    record = json.loads((run / "rounds" / "round-00000" / "groups.json").read_text())
    reward = load_text_reward(f"cdr:{TOY_LM}:{weak}")
    first = record["completions"][0]
    torch.testing.assert_close(torch.tensor(record["rewards"][0]), reward(first, [record["prompts"][0]] * len(first)),
                               rtol=1e-5, atol=1e-5)
    assert record["reward"] == "cdr"


def test_eval_reports_each_models_ranking_accuracy_on_pairs(tmp_path, capsys):
    """``--pairs``: the share of pairs whose chosen completion the model gives the higher summed log-likelihood."""
    data = text_pairs(tmp_path / "pairs.parquet", n=6)
    out = tmp_path / "eval"
    assert main(["eval", "--base", str(TOY_LM), "--prompts", "toy_text_heldout", "--seeds", "1", "--max-new-tokens",
                 "12", "--pairs", str(data), "--out", str(out)]) == 0
    model, tokenizer = load_trained_lm(TOY_LM)
    right = [float(torch.sub(*summed_logps(model, tokenizer, r["prompt"], [r["chosen"], r["rejected"]])[0]) > 0)
             for r in pq.read_table(data).to_pylist()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base"]["ranking_acc"] == pytest.approx(sum(right) / len(right))
    assert metrics["base"]["ranking_acc_low"] <= metrics["base"]["ranking_acc"] <= metrics["base"]["ranking_acc_high"]
    assert "ranking_acc" in capsys.readouterr().out
    assert main(["eval", "--base", str(TOY_BASE), "--prompts", "toy_heldout", "--pairs", str(data),
                 "--out", str(tmp_path / "no")]) != 0
    assert "--pairs ranks text pairs" in " ".join(capsys.readouterr().err.split())
