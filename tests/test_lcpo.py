"""LCPO (Cao et al. 2025): the E-step posterior, the expected loss, the running reliability, on diffusion."""

import math
from pathlib import Path

import pytest
import torch

from diffalign import losses
from diffalign.diffusion import backbone_for, load_pipeline
from diffalign.losses.noisy_labels import LabelReliability, label_posterior
from diffalign.train.config import ObjectiveConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_sd15():
    return backbone_for(load_pipeline(ROOT / "assets/models/tiny-sd15", random_init=True))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


PC, PR = [0.3, -0.2, 0.0], [0.1, 0.4, -0.5]  # policy scores of chosen, rejected; references 0
BETA, ETA = 2.0, 0.8


def test_lcpo_on_dpo_by_hand():
    """p = sigma(beta Delta); w = eta p / (eta p + (1 - eta)(1 - p)); loss = -w log p - (1 - w) log(1 - p)."""
    expected = []
    for w_score, l_score in zip(PC, PR):
        p = sigmoid(BETA * (w_score - l_score))
        w = ETA * p / (ETA * p + (1 - ETA) * (1 - p))
        expected.append(-w * math.log(p) - (1 - w) * math.log(1 - p))
    zeros = torch.zeros(3, dtype=torch.float64)
    got = losses.get("lcpo")(torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64),
                             zeros, zeros, beta=BETA, reliability=ETA)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_lcpo_wraps_any_pairwise_loss_through_its_induced_preference_model():
    """For IPO, P(w beats l) = exp(-L(w, l)) / (exp(-L(w, l)) + exp(-L(l, w))) (the paper's link)."""
    expected = []
    for w_score, l_score in zip(PC, PR):
        loss, flipped = (w_score - l_score - 1 / (2 * BETA)) ** 2, (l_score - w_score - 1 / (2 * BETA)) ** 2
        p = math.exp(-loss) / (math.exp(-loss) + math.exp(-flipped))
        w = ETA * p / (ETA * p + (1 - ETA) * (1 - p))
        expected.append(w * loss + (1 - w) * flipped)
    zeros = torch.zeros(3, dtype=torch.float64)
    got = losses.get("lcpo")(torch.tensor(PC, dtype=torch.float64), torch.tensor(PR, dtype=torch.float64),
                             zeros, zeros, beta=BETA, reliability=ETA, base="ipo")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="wraps a pairwise loss"):
        losses.get("lcpo")(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, base="kto")


def test_a_pair_the_model_firmly_disputes_barely_moves_it():
    """Gradient direction: with w held, d loss / d Delta = -beta (w - p), and w's odds are p's times
    eta / (1 - eta); so every pair is pushed towards its label, a pair the model agrees with about as
    DPO pushes it, one whose label it finds very unlikely (p << 1 - eta) about 1% as hard."""
    pc = torch.tensor([0.5, -3.0], requires_grad=True)
    pr = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.zeros(2)
    losses.get("lcpo")(pc, pr, ref, ref, beta=2.0, reliability=0.8).sum().backward()
    dpo_pc = torch.tensor([0.5, -3.0], requires_grad=True)
    losses.get("dpo")(dpo_pc, pr.detach(), ref, ref, beta=2.0).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent: chosen up, rejected down
    ratio = (pc.grad / dpo_pc.grad).tolist()
    assert 0.5 < ratio[0] < 1.0 and ratio[1] < 0.01
    assert label_posterior(torch.tensor([0.0]), torch.tensor([0.0]), 0.8).item() == pytest.approx(0.8)


def test_label_reliability_is_a_moving_average_of_the_posteriors_and_resumes():
    eta = LabelReliability(initial=0.9, momentum=0.5)
    eta.update(torch.tensor(0.5))
    assert eta.value.item() == pytest.approx(0.7)
    eta.update(torch.tensor(float("nan")))  # a skipped step leaves it
    assert eta.value.item() == pytest.approx(0.7)
    copy = LabelReliability()
    copy.load_state_dict(eta.state_dict())
    assert copy.value.item() == pytest.approx(0.7)
    with pytest.raises(ValueError, match="probability"):
        LabelReliability(initial=1.0)


def test_lcpo_on_diffusion_re_estimates_the_reliability_each_step(tiny_sd15):
    """The objective's E-step uses the reliability before the step; its M-step then moves it by 1% towards
    the batch's mean posterior; the reliability is logged, checkpointed, and fixed by loss_options."""
    from diffalign.objectives import OBJECTIVES

    beta = 2.0
    objective = OBJECTIVES["diffusion_dpo"](ObjectiveConfig(name="diffusion_dpo", loss="lcpo", beta=beta), tiny_sd15)
    assert objective.attach(tiny_sd15.denoiser) == [objective.label_reliability]
    policy, reference = torch.tensor([[0.5, 0.0], [-3.0, 0.0]]), torch.zeros(2, 2)
    options = objective.loss_options(policy, reference)
    assert options["reliability"].item() == pytest.approx(0.9)
    posterior = [0.9 * p / (0.9 * p + 0.1 * (1 - p)) for p in (sigmoid(beta * 0.5), sigmoid(beta * -3.0))]
    assert objective.label_reliability.value.item() == pytest.approx(0.9 + 0.01 * (sum(posterior) / 2 - 0.9))
    got = objective.per_group_loss(policy, reference, preference=None, scores=None, options=options)
    expected = losses.get("lcpo")(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta=beta,
                                  reliability=0.9)
    torch.testing.assert_close(got, expected)
    fixed = OBJECTIVES["diffusion_dpo"](ObjectiveConfig(name="diffusion_dpo", loss="lcpo", beta=beta,
                                                        loss_options={"reliability": 0.6}), tiny_sd15)
    assert fixed.attach(tiny_sd15.denoiser) == [] and fixed.loss_options(policy, reference)["reliability"] == 0.6
