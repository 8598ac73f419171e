"""BCO's underlying distribution matching on an LM: the classifier is TRL's logistic regression (balanced, C = 1) at
its optimum, it tells shifted prompt distributions apart, each undesirable row's loss is weighted by its prompt's
clipped density ratio (by hand), the classifier goes into the checkpoints, and the options are checked."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from diffalign.errors import UserError
from diffalign.lm.loading import load_trained_lm
from diffalign.lm.tokenize import collate, tokenize_group
from diffalign.losses.udm import UDMClassifier
from diffalign.objectives.lm_kto import prompt_embeddings
from diffalign.paths import CONFIGS
from diffalign.toy import text_world as tw
from diffalign.toy.text_model import TOY_LM
from diffalign.train import load_config, train
from diffalign.train.run_state import STATE_FILE

SMALL = ["train.max_steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
         "train.report_to=none", "objective.loss=bco", "objective.options.udm=true"]


def test_the_classifier_is_at_the_balanced_logistic_regressions_optimum():
    """The gradient of 0.5 |w|^2 + sum_i s_i softplus(-y_i (w x_i + b)) vanishes at the fit, s the balanced weights."""
    g = torch.Generator().manual_seed(0)
    good, bad = torch.randn(30, 4, generator=g) + 1.0, torch.randn(10, 4, generator=g) - 1.0
    clf = UDMClassifier().fit(good, bad)
    w, b = clf.weight.double().requires_grad_(), clf.bias.double().requires_grad_()
    x, y = torch.cat([good, bad]).double(), torch.cat([torch.ones(30), -torch.ones(10)]).double()
    s = torch.where(y > 0, 40 / 60, 40 / 20)
    (0.5 * (w * w).sum() + (s * F.softplus(-y * (x @ w + b))).sum()).backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs() < 1e-5
    assert clf.prob_desirable(good).mean() > 0.8 and clf.prob_desirable(bad).mean() < 0.2


def shifted(path):
    """Desirable rows only for red prompts; undesirable ones for red and blue: the two prompt distributions differ."""
    rows = []
    for animal in tw.ANIMALS:
        red, blue = tw.prompt("red", animal), tw.prompt("blue", animal)
        rows.append((red, " " + tw.sentence("red", animal, "joyful", "runs", "slowly"), True))
        rows.append((red, " " + tw.sentence("red", animal, "angry", "runs", "slowly"), False))
        rows.append((blue, " " + tw.sentence("blue", animal, "angry", "runs", "slowly"), False))
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(("prompt", "completion", "label"))}), path)
    return path, rows


def test_undesirable_rows_are_weighted_by_their_prompts_density_ratio(tmp_path):
    """The objective's fit equals the fit by hand on the base's prompt embeddings (every row: fewer than 1024 of each
    label); undesirable rows with desirable-looking prompts (red) weigh more; the loss is BCO's with those weights."""
    import math

    from diffalign.data.text import TextUnpairedDataset
    from diffalign.objectives import OBJECTIVES
    from diffalign.train.config import ObjectiveConfig

    data, rows = shifted(tmp_path / "shifted.parquet")
    model, tokenizer = load_trained_lm(TOY_LM)
    objective = OBJECTIVES["lm_kto"](ObjectiveConfig(loss="bco", loss_options={"delta": 0.0},
                                                     options={"udm": True}), tokenizer)
    objective.fit_to_data(TextUnpairedDataset(data, tokenizer=tokenizer, max_length=None), model, torch.device("cpu"), 0)
    batch = collate([tokenize_group(tokenizer, p, [c]) for p, c, _ in rows], pad_token_id=0, max_length=None)
    labels = torch.tensor([label for _, _, label in rows])
    with torch.no_grad():
        embedded = prompt_embeddings(model, batch)
    by_hand = UDMClassifier().fit(embedded[labels], embedded[~labels])
    p = by_hand.prob_desirable(embedded[~labels])
    torch.testing.assert_close(objective.classifier.prob_desirable(embedded[~labels]), p, rtol=1e-4, atol=1e-5)
    red = torch.tensor(["red" in prompt for prompt, _, label in rows if not label])
    assert p[red].mean() > p[~red].mean()  # an undesirable row whose prompt looks desirable counts for more
    weights = (p / (1 - p)).clamp(0.5, 10.0)
    with torch.no_grad():  # policy = reference: every implicit reward 0, each row's loss log 2 times its weight
        loss, metrics = objective(model, model, {"inputs": batch, "targets": {"labels": labels}})
    expected = (int(labels.sum()) + float(weights.sum())) * math.log(2) / len(rows)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["udm_weight"]) == pytest.approx(float(weights.mean()), rel=1e-4)


def test_a_bco_udm_run_logs_its_weights_and_keeps_the_classifier(tmp_path):
    data, _ = shifted(tmp_path / "shifted.parquet")
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_lm_kto.yaml", [f"data.path={data}", f"output_dir={run}", *SMALL]))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 <= m["udm_weight"] <= 10.0 for m in metrics if "udm_weight" in m)
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step-0000002" / STATE_FILE), "pt") as state:
        saved = json.loads(state.metadata()["state"])
    assert {"weight", "bias"} <= set(saved["objective_1"]["dict"])  # the classifier, beside BCO's running shift


def test_udm_options_are_checked():
    with pytest.raises(UserError, match="objective.loss=bco"):
        load_config(CONFIGS / "toy_lm_kto.yaml", ["objective.options.udm=true"])
    with pytest.raises(UserError, match="udm_min_ratio"):
        load_config(CONFIGS / "toy_lm_kto.yaml", ["objective.loss=bco", "objective.options.udm=true",
                                                  "objective.options.udm_min_ratio=20"])


def test_a_prompts_embedding_is_its_pooled_vector_or_its_tokens_mean():
    from diffalign.diffusion.backbones import Conditioning

    embeds = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(Conditioning(embeds, pooled=torch.ones(2, 5)).prompt_embedding(), torch.ones(2, 5))
    assert torch.equal(Conditioning(embeds).prompt_embedding(), embeds.mean(1))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(Conditioning(embeds, mask=mask).prompt_embedding(),
                               torch.stack([embeds[0, :2].mean(0), embeds[1, 0]]))


def test_diffusion_kto_weights_its_undesirable_images_by_hand(tmp_path):
    """per_group_loss with the images' prompt embeddings: BCO's loss with each undesirable image times its clipped
    density ratio; then a toy run fits the classifier on the captions, logs the weights and checkpoints them."""
    from diffalign import losses
    from diffalign.diffusion import backbone_for, load_pipeline
    from diffalign.objectives import OBJECTIVES
    from diffalign.paths import TOY_BASE
    from diffalign.train.config import ObjectiveConfig

    objective = OBJECTIVES["diffusion_kto"](ObjectiveConfig(name="diffusion_kto", loss="bco", beta=10.0,
                                                            loss_options={"delta": 0.0}, options={"udm": True}),
                                            backbone_for(load_pipeline(TOY_BASE)))
    g = torch.Generator().manual_seed(0)
    objective.classifier.fit(torch.randn(8, 3, generator=g) + 1, torch.randn(8, 3, generator=g) - 1)
    embeddings = torch.randn(4, 3, generator=g)
    policy, reference = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
    liked = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = objective.per_group_loss(policy, reference, preference=liked, scores=None,
                                   options={"delta": 0.0, "udm_embeddings": embeddings})
    p = objective.classifier.prob_desirable(embeddings[liked == 0])
    weights = (p / (1 - p)).clamp(0.5, 10.0)
    by_hand = losses.get("bco")(policy[liked == 1, 0], policy[liked == 0, 0], reference[liked == 1, 0],
                                reference[liked == 0, 0], beta=10.0, delta=0.0, rejected_weights=weights)
    torch.testing.assert_close(got[liked == 1], by_hand[:2])
    torch.testing.assert_close(got[liked == 0], by_hand[2:])
    run = tmp_path / "run"
    train(load_config(CONFIGS / "toy_diffusion_kto.yaml", [f"output_dir={run}", "objective.loss=bco",
                                                           "objective.options.udm=true", "train.max_steps=2",
                                                           "train.batch_size=4", "train.checkpoint_every=2",
                                                           "validation.every=0", "train.report_to=none"]))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.5 <= m["udm_weight"] <= 10.0 for m in metrics if "udm_weight" in m)
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step-0000002" / STATE_FILE), "pt") as state:
        assert '"weight": {"tensor"' in state.metadata()["state"]
