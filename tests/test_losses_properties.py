"""Registry contract, gradient directions and numerical stability of every loss."""

import pytest
import torch

from diffalign import losses
from diffalign.losses.registry import LOGIT_KINDS

REQUIRED = {
    # pairwise with reference
    "dpo", "hinge", "ipo", "cdpo", "robust", "exo", "nca", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "aot", "aot_unpaired", "discopop", "f_dpo", "rpo", "madpo", "da_dpo", "dpo_margin", "dpop",
    "flex_dpo",
    # unpaired
    "kto", "bco", "npo",
    # reference-free
    "simpo", "orpo", "cpo", "asft",
    # listwise
    "plackett_luce", "lambda_dpo", "adpo", "tpo", "irpo",
    # soft labels and regularisers
    "soft_dpo", "smpo", "sft", "z_loss",
}  # fmt: skip

# options a loss needs beyond beta
EXTRA = {
    "madpo": {"reward_gap": torch.tensor([0.5, 3.0])},
    "da_dpo": {"reward_gap": torch.tensor([0.5, -3.0])},
    "soft_dpo": {"preference": torch.tensor([0.9, 0.8])},
    "smpo": {"preference": torch.tensor([0.9, 0.8])},
    "bt_wide_ties": {"preference": torch.tensor([1.0, 0.5])},
    "sppo": {"win_chosen": torch.tensor([0.8, 0.7]), "win_rejected": torch.tensor([0.2, 0.4])},
    "gpo": {"score_chosen": torch.tensor([0.8, 0.7]), "score_rejected": torch.tensor([-0.2, -0.4])},
    "inpo_nash": {"previous_chosen": torch.tensor([0.0, 0.0]), "previous_rejected": torch.tensor([0.0, 0.0])},
}
# scores are read as average log-probs: must be negative
NEGATIVE_SCORES = {"orpo", "asft", "simpo", "cpo"}


def pairwise_like():
    return [s.name for s in losses.specs() if s.kind not in ("listwise", "token-level", *LOGIT_KINDS)
            and s.name != "z_loss"]


def test_registry_holds_every_required_loss():
    assert REQUIRED <= set(losses.names())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(losses.UnknownLossError) as err:
        losses.get("dpoo")
    assert "'dpo'" in str(err.value) and "simpo" in str(err.value)


def test_every_loss_has_summary_and_paper():
    for s in losses.specs():
        assert s.summary and s.paper and s.fn.__doc__, s.name


def _call(name, pc, pr, rc, rr, beta=0.5):
    return losses.get(name)(pc, pr, rc, rr, beta=beta, **EXTRA.get(name, {}))


# Losses whose paper says: chosen likelihood up, rejected down (at the reference point).
CHOSEN_UP_REJECTED_DOWN = [
    "dpo", "cdpo", "dpo_margin", "dpop", "flex_dpo", "madpo", "da_dpo", "hinge", "ipo", "robust", "exo", "nca", "bco_pair", "sppo_hard",
    "sppo", "gpo", "inpo_nash", "apo_zero", "f_dpo", "rpo", "dpo_norm", "kto", "bco", "simpo", "cpo", "orpo", "asft",
    "soft_dpo", "smpo",
]  # fmt: skip


@pytest.mark.parametrize("name", CHOSEN_UP_REJECTED_DOWN)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    base = -1.0 if name in NEGATIVE_SCORES else 0.0
    pc = torch.full((2,), base, requires_grad=True)
    pr = torch.full((2,), base, requires_grad=True)
    ref = torch.full((2,), base)
    _call(name, pc, pr, ref, ref).sum().backward()
    # gradient descent moves scores by -grad: chosen must go up, rejected down
    assert (pc.grad < 0).all(), (name, pc.grad)
    assert (pr.grad > 0).all(), (name, pr.grad)


def test_apo_down_lowers_both_but_rejected_more():
    """APO-down (Eq. 8): once the pair is ordered (|r_w| < |r_w - r_l|), the chosen's
    likelihood is pushed down too, the rejected's always."""
    pc = torch.tensor([0.5], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    losses.get("apo_down")(pc, pr, torch.zeros(1), torch.zeros(1), beta=1.0).backward()
    assert pc.grad > 0 and pr.grad > 0


def test_discopop_direction():
    """DiscoPOP is non-convex: near Delta = 0 its gradient points the other way (its local
    optimum sits there, matching TRL), but a mis-ordered pair is pushed the right way."""
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([0.0], requires_grad=True)
    losses.get("discopop")(pc, pr, torch.zeros(1), torch.zeros(1), beta=1.0).backward()
    assert pc.grad < 0 and pr.grad > 0


def test_npo_lowers_forget_likelihood():
    pr = torch.zeros(3, requires_grad=True)
    losses.get("npo")(None, pr, None, torch.zeros(3), beta=0.5).sum().backward()
    assert (pr.grad > 0).all()


@pytest.mark.parametrize("name", ["plackett_luce", "lambda_dpo", "tpo", "adpo", "irpo"])
def test_listwise_raises_best_and_lowers_worst(name):
    policy = torch.tensor([[0.3, 0.2, 0.1, 0.0]], requires_grad=True)
    ref = torch.zeros(1, 4)
    losses.get(name)(policy, ref, beta=1.0).sum().backward()
    assert policy.grad[0, 0] < 0 and policy.grad[0, -1] > 0, policy.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", pairwise_like())
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_no_nan_or_inf_for_huge_margins(name, margin, dtype):
    if name in NEGATIVE_SCORES:  # scores are log-probs <= 0: take them near 0 and very negative
        hi, lo = -1e-4, -1e4
        pc_v, pr_v = (hi, lo) if margin > 0 else (lo, hi)
        ref_v = 0.0
    else:
        pc_v, pr_v, ref_v = margin / 2, -margin / 2, 0.0
    pc = torch.full((2,), pc_v, dtype=dtype, requires_grad=True)
    pr = torch.full((2,), pr_v, dtype=dtype, requires_grad=True)
    ref = torch.full((2,), ref_v, dtype=dtype)
    out = _call(name, pc, pr, ref, ref, beta=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all(), (name, out)
    for grad in (pc.grad, pr.grad):  # None where a loss ignores that side (npo, sft)
        assert grad is None or torch.isfinite(grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", losses.names("listwise"))
def test_listwise_stable_for_huge_scores(name, dtype):
    policy = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4]], dtype=dtype, requires_grad=True)
    out = losses.get(name)(policy, torch.zeros(2, 3, dtype=dtype), beta=1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(policy.grad).all()


def test_losses_return_float32_for_half_inputs():
    args = [torch.zeros(2, dtype=torch.bfloat16) for _ in range(4)]
    assert losses.get("dpo")(*args, beta=0.1).dtype == torch.float32
