"""SoliReward's Bradley-Terry loss with wide ties: by hand, its gradients, and tied pairs training in a run."""

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import pickapic_parquet

from diffalign import losses
from diffalign.errors import UserError
from diffalign.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_bt_wide_ties_by_hand():
    """Decided pair: -log sigma(d - m); tie: -log sigma(d - m) - log sigma(-d - m); d = beta Delta."""
    beta, margin = 2.0, 1.5
    pc, pr = [0.4, 0.4, -0.3], [0.1, 0.1, 0.2]
    preference = [1.0, 0.5, 0.5]
    expected = []
    for w, l, p in zip(pc, pr, preference):
        d = beta * (w - l)
        expected.append(-log_sigmoid(d - margin) - (log_sigmoid(-d - margin) if p == 0.5 else 0.0))
    zeros = torch.zeros(3, dtype=torch.float64)
    got = losses.get("bt_wide_ties")(torch.tensor(pc, dtype=torch.float64), torch.tensor(pr, dtype=torch.float64),
                                     zeros, zeros, beta=beta, preference=torch.tensor(preference), margin=margin)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("delta, direction", [(3.0, "down"), (-3.0, "up"), (0.0, "still")])
def test_a_tie_pulls_the_two_rewards_together_and_a_win_apart(delta, direction):
    """Gradient directions: a tie whose implicit rewards are far apart is pulled together from either side
    (and one at equal rewards feels no push); a decided pair's chosen always goes up."""
    pc = torch.tensor([delta], requires_grad=True)
    ref = torch.zeros(1)
    losses.get("bt_wide_ties")(pc, torch.zeros(1), ref, ref, beta=1.0, preference=0.5).sum().backward()
    grad = pc.grad.item()  # descent moves Delta by -grad
    assert {"down": grad > 0, "up": grad < 0, "still": grad == 0}[direction]
    win = torch.tensor([delta], requires_grad=True)
    losses.get("bt_wide_ties")(win, torch.zeros(1), ref, ref, beta=1.0, preference=1.0).sum().backward()
    assert win.grad.item() < 0


def test_tied_rows_train_with_data_ties_soft_and_are_refused_without_a_soft_label_loss(tmp_path):
    """Pick-a-Pic's 0.5/0.5 rows: dropped by default; with data.ties=soft and this loss they train."""
    data = pickapic_parquet(tmp_path / "pairs.parquet", 6, tie_rows=(0, 1, 2, 3, 4, 5))

    def config(*more):
        return load_config(ROOT / "configs" / "tiny_sdxl_dpo.yaml",
                           [f"data.path={data}", f"output_dir={tmp_path / 'run'}",
                            "model.path=" + str(ROOT / "assets/models/tiny-sdxl"), "train.max_steps=2",
                            "train.checkpoint_every=0", *more])

    with pytest.raises(UserError, match="soft-label loss"):
        config("data.ties=soft")  # the default loss (dpo) has no use for a 0.5
    with pytest.raises(UserError, match="no usable pair"):
        train(config())  # every row a tie, all dropped
    summary = train(config("data.ties=soft", "objective.loss=bt_wide_ties"))
    assert summary["steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # an untrained LoRA is its reference: d = 0, so every tie costs 2 * -log sigma(-3)
    assert logged[0]["loss"] == pytest.approx(-2 * log_sigmoid(-3.0), rel=1e-4)
