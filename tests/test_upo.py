"""UPO's reliable pairs (Wang et al. 2025): BALD by hand, the majority vote and the certainty sampling of the
authors' estimating code, MC dropout on a real sequence classifier, and an LM run that trains on the kept pairs."""

from __future__ import annotations

import math

import pytest
import torch
from lm_helpers import lm_config, text_pairs
from transformers import GPT2ForSequenceClassification

from diffalign.data.text import TextPairDataset
from diffalign.data.uncertainty import (
    bald,
    estimation_text,
    keep_reliable_pairs,
    mc_dropout_probs,
    reliable_pairs,
)
from diffalign.errors import UserError
from diffalign.toy.text_model import TOY_LM, toy_lm_config, toy_tokenizer
from diffalign.train import load_config, train


def entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_bald_is_the_entropy_of_the_mean_minus_the_mean_entropy():
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.7, 0.3], [0.5, 0.5]]])  # 2 passes, 2 pairs
    first = entropy([0.8, 0.2]) - (entropy([0.9, 0.1]) + entropy([0.7, 0.3])) / 2
    torch.testing.assert_close(bald(probs), torch.tensor([first, 0.0], dtype=torch.float64), atol=1e-8, rtol=0)


def test_pairs_the_estimator_votes_against_are_noise_and_the_rest_are_sampled_by_certainty():
    sure, split, against = [0.99, 0.01], [[0.99, 0.01], [0.01, 0.99]], [0.2, 0.8]
    probs = torch.tensor([[sure, split[0], against, sure], [sure, split[1], against, sure]])  # (2 passes, 4 pairs)
    kept, noise = reliable_pairs(probs, 0.5, torch.Generator().manual_seed(0))
    assert noise == 1 and len(kept) == 1 and 2 not in kept  # a 1-1 vote agrees (argmax of bincount gives 0)
    # one of the two sure pairs and the split one: drawn in proportion to certainty 1 - BALD
    certainty = 1 - bald(probs[:, [1, 3]])
    drawn = [reliable_pairs(probs[:, [1, 3]], 0.5, torch.Generator().manual_seed(s))[0][0] for s in range(2000)]
    share = drawn.count(0) / len(drawn)
    assert share == pytest.approx(float(certainty[0] / certainty.sum()), abs=0.03)
    assert reliable_pairs(probs, 0.5, torch.Generator().manual_seed(7)) == reliable_pairs(
        probs, 0.5, torch.Generator().manual_seed(7))


def estimator(folder, texts: list[str] | None = None, seed: int = 0):
    """A 2-label GPT-2 classifier with dropout 0.1; given ``texts``, its head reads the direction in which their
    last hidden states differ most from their mean, so its vote varies from pair to pair."""
    torch.manual_seed(seed)
    config = toy_lm_config().__class__(**{**toy_lm_config().to_dict(), "num_labels": 2, "n_positions": 128,
                                          "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1})
    model = GPT2ForSequenceClassification(config).eval()
    if texts:
        with torch.no_grad():
            batch = toy_tokenizer()(texts, return_tensors="pt", padding=True)
            hidden = model.transformer(**batch).last_hidden_state[:, -1]
            centred = hidden - hidden.mean(0)
            direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
            scale = 3.0 / (centred @ direction).abs().mean()
            model.score.weight.copy_(torch.stack([direction, -direction]) * scale)
    model.save_pretrained(str(folder))
    toy_tokenizer().save_pretrained(str(folder))
    return folder


def test_mc_dropout_runs_the_classifier_with_dropout_on_and_puts_it_back(tmp_path):
    model = GPT2ForSequenceClassification.from_pretrained(str(estimator(tmp_path / "est"))).eval()
    tokenizer = toy_tokenizer()
    batch = tokenizer([estimation_text("describe the red fox :", "the red fox is joyful .", "the red fox is angry .")],
                      return_tensors="pt")
    probs = mc_dropout_probs(model, [batch], passes=4)
    assert probs.shape == (4, 1, 2) and not model.training
    assert len({round(float(p), 6) for p in probs[:, 0, 0]}) > 1  # the passes differ: dropout was on
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 1))


def test_an_lm_run_trains_on_the_pairs_the_estimator_keeps(tmp_path, capsys):
    data = text_pairs(tmp_path / "pairs.parquet", n=12)
    pairs = TextPairDataset(data, tokenizer=toy_tokenizer())
    folder = estimator(tmp_path / "est", [estimation_text(*pairs.pair(i)) for i in range(len(pairs))])
    config = lm_config(tmp_path, data, f"data.estimator={folder}", "train.max_steps=1", "train.batch_size=2")
    summary = train(config)
    said = capsys.readouterr().err
    assert "data.estimator: kept" in said and summary["steps"] == 1
    kept = int(said.split("data.estimator: kept ")[1].split(" ")[0])
    noise = int(said.split(" pairs (")[1].split(" ")[0])
    assert noise >= 1 and kept == (12 - noise) // 2  # some pairs voted noise; half of the rest kept
    # the same pairs every time (seeded by train.seed), as many as keep x the agreeing ones
    a, b = (TextPairDataset(data, tokenizer=toy_tokenizer()) for _ in range(2))
    for dataset in (a, b):
        keep_reliable_pairs(dataset, str(folder), passes=10, keep=0.5, seed=config.train.seed)
    assert a.indices == b.indices and len(a) == kept


def test_the_estimator_settings_are_checked():
    base = [f"model.path={TOY_LM}", "data.path=x", "objective.name=lm_dpo", "objective.loss=dpo"]
    with pytest.raises(UserError, match=r"data.estimator_keep must be in \(0, 0.5\]"):
        load_config(None, [*base, "data.estimator=est", "data.estimator_keep=0.8"])
    with pytest.raises(UserError, match="data.estimator picks reliable text pairs; lm_kto reads text_unpaired"):
        load_config(None, [*base, "data.estimator=est", "objective.name=lm_kto", "objective.loss=kto"])
