"""Each loss without a TRL counterpart against its paper's formula, computed by hand.

The expected values are written out with Python floats from the paper's equation, not with
the library's helpers, so a sign or constant slip in the library shows up here.
"""

import math

import pytest
import torch

from diffalign import losses

T = torch.tensor


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# one example: r_w = 1.0 - 0.5 = 0.5, r_l = -0.2 - 0.3 = -0.5, Delta = 1.0
PC, PR, RC, RR = T([1.0]), T([-0.2]), T([0.5]), T([0.3])


def close(value, expected, tol=1e-6):
    torch.testing.assert_close(value, torch.as_tensor(expected, dtype=value.dtype), atol=tol, rtol=tol)


def test_dpo_hand_value():
    """beta = 0.5, Delta = 1: -log sigma(0.5) = 0.474077."""
    close(losses.get("dpo")(PC, PR, RC, RR, beta=0.5), [0.4740769841801067])


def test_cdpo_is_label_smoothed_dpo():
    """eps = 0.1: -(0.9 log sigma(0.5) + 0.1 log sigma(-0.5))."""
    expected = -(0.9 * logsig(0.5) + 0.1 * logsig(-0.5))
    close(losses.get("cdpo")(PC, PR, RC, RR, beta=0.5), [expected])


def test_dpo_margin():
    close(losses.get("dpo_margin")(PC, PR, RC, RR, beta=0.5, margin=0.2), [-logsig(0.5 - 0.2)])


def test_dpop_is_dpo_while_the_chosen_stays_above_its_reference():
    """DPOP Eq. 3. Example 1 is the shared one (r_w = 0.5 >= 0: no penalty, DPO's value).
    Example 2: r_w = 0.2 - 0.5 = -0.3, r_l = -1.0 - 0.0 = -1.0, so DPO sees Delta = 0.7 but DPOP
    with lambda = 2 sees 0.7 - 2 * 0.3 = 0.1: -log sigma(0.5 * 0.1)."""
    out = losses.get("dpop")(T([1.0, 0.2]), T([-0.2, -1.0]), T([0.5, 0.5]), T([0.3, 0.0]), beta=0.5, lambda_dpop=2.0)
    close(out, [-logsig(0.5 * 1.0), -logsig(0.5 * 0.1)])


def test_dpop_pushes_a_chosen_below_its_reference_up_harder_than_dpo():
    """DPO's failure mode (Pal et al. 2024, Sec. 3): the margin is fine but the chosen fell below the reference."""
    grads = {}
    for name, options in (("dpo", {}), ("dpop", {"lambda_dpop": 5.0})):
        pc = torch.tensor([-0.5], requires_grad=True)
        losses.get(name)(pc, T([-3.0]), T([0.0]), T([0.0]), beta=1.0, **options).sum().backward()
        grads[name] = pc.grad.item()
    assert grads["dpop"] < grads["dpo"] < 0  # descent raises the chosen in both, much more under DPOP


def test_flex_dpo_puts_its_own_beta_on_the_rejected_log_ratio():
    """Flex-DPO: -log sigma(beta+ r_w - beta- r_l), beta- = ratio * beta+; ratio 1 is DPO, and unset it is 0.8."""
    pc, pr, rc, rr = T([1.0, 0.2]), T([-0.2, -1.0]), T([0.5, 0.5]), T([0.3, 0.0])
    out = losses.get("flex_dpo")(pc, pr, rc, rr, beta=0.5, beta_rejected_ratio=0.6)
    close(out, [-logsig(0.5 * 0.5 - 0.3 * -0.5), -logsig(0.5 * -0.3 - 0.3 * -1.0)])
    dpo = losses.get("dpo")(pc, pr, rc, rr, beta=0.5)
    close(losses.get("flex_dpo")(pc, pr, rc, rr, beta=0.5, beta_rejected_ratio=1.0), dpo)
    close(losses.get("flex_dpo")(pc, pr, rc, rr, beta=0.5), [-logsig(0.5 * 0.5 - 0.4 * -0.5), -logsig(0.5 * -0.3 - 0.4 * -1.0)])
    with pytest.raises(ValueError, match="beta_rejected_ratio"):
        losses.get("flex_dpo")(pc, pr, rc, rr, beta=0.5, beta_rejected_ratio=0.0)


def test_flex_dpo_scales_the_rejected_to_chosen_gradient_ratio_by_beta_minus_over_beta_plus():
    """The paper's Corollary 1 in log space: under DPO |dl/dr_l| / |dl/dr_w| = 1; Flex-DPO makes it beta- / beta+,
    so a smaller beta- pushes the rejected down more gently than the chosen is pulled up."""
    pc, pr = torch.tensor([0.3], requires_grad=True), torch.tensor([-0.4], requires_grad=True)
    losses.get("flex_dpo")(pc, pr, T([0.0]), T([0.0]), beta=1.0, beta_rejected_ratio=0.25).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pr.grad.item() / -pc.grad.item() == pytest.approx(0.25)


def madpo_weight_by_hand(h, c_max=2.0, lam=1.0, tau=math.log(999.0)):
    """The authors' MADPOLoss weight (utils/loss_functions.py) for a pair labelled as the reward model ranks it."""
    c_min = 1 / c_max
    c = c_min + (c_max - c_min) / (1 + (c_max - 1) / (1 - c_min) * math.exp(lam * (abs(h) - tau)))
    return sig(c * h) / sig(h) if h > -tau else 1.0


def test_madpo_weights_each_pair_by_w_of_its_reward_margin():
    """MADPO: hard pairs (small margin h) weigh more than 1, easy ones (large h) less; h <= -tau keeps 1."""
    pc, pr, rc, rr = T([1.0, 0.0, 0.5, 0.2]), T([0.0, 1.0, 0.0, 0.1]), T([0.0] * 4), T([0.0] * 4)
    gaps = [0.3, 9.0, -2.0, -8.0]
    out = losses.get("madpo")(pc, pr, rc, rr, beta=1.0, reward_gap=T(gaps))
    deltas = [1.0, -1.0, 0.5, 0.1]
    close(out, [madpo_weight_by_hand(h) * -logsig(d) for h, d in zip(gaps, deltas)])
    weights = [madpo_weight_by_hand(h) for h in gaps]
    assert weights[0] > 1 > weights[1] and weights[3] == 1.0
    close(losses.madpo_weight(T(gaps), c_max=4.0, tau=7.0), [madpo_weight_by_hand(h, 4.0, 1.0, 7.0) for h in gaps])


def test_da_dpo_scales_beta_by_the_score_gap():
    """DA-DPO (the authors' dpo_loss): -log sigma(beta alpha (|g| + 1) Delta)."""
    pc, pr, rc, rr = T([1.0, 0.0]), T([0.0, 0.5]), T([0.0, 0.0]), T([0.0, 0.0])
    out = losses.get("da_dpo")(pc, pr, rc, rr, beta=0.5, reward_gap=T([0.2, -1.5]), alpha=2.0)
    close(out, [-logsig(0.5 * 2.0 * 1.2 * 1.0), -logsig(0.5 * 2.0 * 2.5 * -0.5)])


def test_rpo_adds_per_token_nll_of_chosen():
    """RPO Eq. 2: DPO - alpha * log pi(y_w) / |y_w| with log pi(y_w) = 1.0 over 4 tokens."""
    out = losses.get("rpo")(PC, PR, RC, RR, beta=0.5, alpha=2.0, chosen_lengths=T([4.0]))
    close(out, [-logsig(0.5) - 2.0 * 1.0 / 4])


def test_kto_with_given_kl():
    """KTO Eq. 8: desirable 1 - sigma(beta (r_w - z0)), undesirable 1 - sigma(beta (z0 - r_l))."""
    out = losses.get("kto")(PC, PR, RC, RR, beta=2.0, kl=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    close(out, [1 - sig(2.0 * (0.5 - 0.1)), 1.5 * (1 - sig(2.0 * (0.1 + 0.5)))])


def test_kto_batch_kl_baseline_is_clamped_mean_and_detached():
    pc, rc = T([3.0, 1.0]), T([0.0, 0.0])  # chosen log-ratios 3, 1
    pr, rr = T([-1.0]), T([0.0])  # rejected log-ratio -1 ; mean of all = 1
    out = losses.get("kto")(pc, pr, rc, rr, beta=1.0)
    close(out, [1 - sig(3 - 1), 1 - sig(1 - 1), 1 - sig(1 + 1)])
    # mismatched-pair estimate, negative -> clamped to 0
    out = losses.get("kto")(pc, pr, rc, rr, beta=1.0, policy_kl=T([-5.0]), ref_kl=T([0.0]))
    close(out, [1 - sig(3), 1 - sig(1), 1 - sig(1)])


def test_kto_accepts_unbalanced_and_missing_sides():
    out = losses.get("kto")(T([1.0, 2.0, 3.0]), None, T([0.0, 0.0, 0.0]), None, beta=1.0, kl=0.0)
    assert out.shape == (3,)


def test_apo_zero_unpaired_is_apo_zeros_two_terms_each_on_its_examples():
    """APO Eq. 7 apart: desirable 1 - sigma(beta r_w), undesirable sigma(beta r_l), with KTO's weights."""
    out = losses.get("apo_zero_unpaired")(PC, PR, RC, RR, beta=2.0, desirable_weight=1.0, undesirable_weight=1.5)
    close(out, [1 - sig(2.0 * 0.5), 1.5 * sig(2.0 * -0.5)])
    close(out.sum(), losses.get("apo_zero")(PC, PR, RC, RR, beta=2.0)[0] + 0.5 * sig(2.0 * -0.5))
    close(losses.get("apo_zero_unpaired")(None, PR, None, RR, beta=2.0), [sig(2.0 * -0.5)])


def test_bco_with_shift_and_udm_weights():
    out = losses.get("bco")(PC, PR, RC, RR, beta=1.0, delta=0.2, rejected_weights=T([3.0]))
    close(out, [-logsig(0.5 - 0.2), 3.0 * -logsig(-(-0.5 - 0.2))])


def test_reward_shift_is_running_mean_across_batches():
    shift = losses.RewardShift()
    shift.update(T([1.0, 3.0]))
    assert float(shift.update(T([5.0]))) == pytest.approx(3.0)
    restored = losses.RewardShift()
    restored.load_state_dict(shift.state_dict())
    assert float(restored.value) == pytest.approx(3.0)
    assert float(restored.update(T([1.0, float("nan")]))) == pytest.approx(3.0)  # a skipped step leaves it alone
    assert restored.count == 3


def test_udm_weights_density_ratio_clipped():
    close(losses.udm_weights(T([0.5, 0.8, 0.999, 0.01])), [1.0, 4.0, 10.0, 0.5], tol=1e-5)


def test_npo_formula():
    """NPO Eq. 3: (2/beta) log(1 + (pi/pi_ref)^beta) with log-ratio -0.5, beta 0.4."""
    out = losses.get("npo")(None, PR, None, RR, beta=0.4)
    close(out, [(2 / 0.4) * math.log1p(math.exp(0.4 * -0.5))])


def test_simpo_formula():
    """SimPO Eq. 6 with summed log-probs over lengths 2 and 4."""
    out = losses.get("simpo")(
        T([-2.0]), T([-6.0]), None, None, beta=2.0, gamma=0.5, chosen_lengths=T([2.0]), rejected_lengths=T([4.0])
    )
    close(out, [-logsig(2.0 * (-1.0 - -1.5) - 0.5)])


def test_cpo_formula():
    out = losses.get("cpo")(T([-1.0]), T([-2.0]), None, None, beta=0.5, nll_weight=1.0)
    close(out, [-logsig(0.5) + 1.0])


def test_orpo_formula():
    """ORPO: -log P_w - lambda log sigma(log(P_w/(1-P_w)) - log(P_l/(1-P_l)))."""
    pw, pl = math.exp(-0.5), math.exp(-1.5)
    log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    out = losses.get("orpo")(T([-0.5]), T([-1.5]), None, None, beta=0.1)
    close(out, [0.5 - 0.1 * logsig(log_or)])


def test_asft_formula():
    """ASFT: -log P_w + lambda (-log P_w - log(1 - P_l))."""
    pw, pl = math.exp(-0.5), math.exp(-1.5)
    out = losses.get("asft")(T([-0.5]), T([-1.5]), None, None, beta=0.2)
    close(out, [0.5 + 0.2 * (-math.log(pw) - math.log(1 - pl))])


def test_reference_free_losses_accept_none_references():
    for name in losses.names("reference-free"):
        out = losses.get(name)(T([-0.3, -0.9]), T([-1.2, -0.4]), None, None, beta=0.5)
        assert out.shape == (2,) and torch.isfinite(out).all()


def test_reference_losses_reject_none_references_clearly():
    with pytest.raises(ValueError, match="reference scores"):
        losses.get("dpo")(PC, PR, None, None, beta=0.1)


def test_soft_dpo_and_smpo():
    out = losses.get("soft_dpo")(PC, PR, RC, RR, beta=0.5, preference=0.7)
    close(out, [-(0.7 * logsig(0.5) + 0.3 * logsig(-0.5))])
    # SmPO Eq. 9: -log sigma((2p - gamma) beta Delta)
    out = losses.get("smpo")(PC, PR, RC, RR, beta=0.5, preference=T([0.8]))
    close(out, [-logsig((1.6 - 1.0) * 0.5)])
    tie = losses.get("smpo")(PC, PR, RC, RR, beta=0.5, preference=0.5)
    close(tie, [math.log(2.0)])
    hard = losses.get("smpo")(PC, PR, RC, RR, beta=0.5, preference=1.0)
    close(hard, losses.get("dpo")(PC, PR, RC, RR, beta=0.5))


def test_plackett_luce_three_items():
    """DPO-PL (DPO Eq. 19): -[z1 - lse(z1,z2,z3)] - [z2 - lse(z2,z3)] for z = beta r, best first."""
    policy, ref = T([[1.0, 0.5, -1.0]]), T([[0.0, 0.0, 0.0]])
    z = [0.5, 0.25, -0.5]
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    expected = -(z[0] - lse(*z)) - (z[1] - lse(z[1], z[2]))
    close(losses.get("plackett_luce")(policy, ref, beta=0.5), [expected])
    # the same list given shuffled with scores gives the same loss
    shuffled = losses.get("plackett_luce")(T([[0.5, -1.0, 1.0]]), ref, beta=0.5, scores=T([[2.0, 1.0, 3.0]]))
    close(shuffled, [expected])


def test_lambda_dpo_dcg_weights():
    """RankDPO Eq. 6-7 for a list of 3, best first, relevance 2, 1, 0 (gains 3, 1, 0).

    Current implicit rewards r = (0, 1, 2) rank the items 3rd, 2nd, 1st:
    D = log2(1 + rank) gives 1/D = (1/2, 1/log2(3), 1).
    """
    policy, ref = T([[0.0, 1.0, 2.0]]), T([[0.0, 0.0, 0.0]])
    inv_d = [0.5, 1 / math.log2(3), 1.0]
    gains = [3.0, 1.0, 0.0]
    r = [0.0, 1.0, 2.0]
    expected = 0.0
    for i in range(3):
        for j in range(i + 1, 3):
            w = abs(gains[i] - gains[j]) * abs(inv_d[i] - inv_d[j])
            expected += w * -logsig(0.7 * (r[i] - r[j]))
    close(losses.get("lambda_dpo")(policy, ref, beta=0.7), [expected], tol=1e-5)


def test_tpo_mean_over_ordered_pairs_ignoring_ties():
    policy, ref = T([[1.0, 0.0, 0.0]]), T([[0.0, 0.0, 0.0]])
    scores = T([[2.0, 1.0, 1.0]])  # item 1 and 2 tie
    expected = (2 * -logsig(1.0)) / 6
    close(losses.get("tpo")(policy, ref, beta=1.0, scores=scores), [expected])


def test_irpo_by_hand_gain_over_position_weights():
    """IRPO (the authors' rdpo_loss): w_i = (2^y_i - 1) / log2(1 + i), L_i = log mean_{j != i} exp(beta (r_j - r_i)),
    loss = -mean_i w_i log sigma(-L_i); relevance from scores, positions in the order listed."""
    policy, ref = T([[0.5, 1.0, -0.5]]), T([[0.0, 0.25, 0.0]])
    r, y, beta = [0.5, 0.75, -0.5], [1.0, 3.0, 0.0], 0.8
    expected = 0.0
    for i in range(3):
        w = (2**y[i] - 1) / math.log2(2 + i)
        log_mean = math.log(sum(math.exp(beta * (r[j] - r[i])) for j in range(3) if j != i) / 2)
        expected += -w * logsig(-log_mean) / 3
    close(losses.get("irpo")(policy, ref, beta=beta, scores=T([y])), [expected])
    # without scores: best first, relevance 2, 1, 0
    best_first = sum(-((2**g - 1) / math.log2(2 + i)) * logsig(-math.log(
        sum(math.exp(beta * (r[j] - r[i])) for j in range(3) if j != i) / 2)) for i, g in enumerate([2, 1, 0])) / 3
    close(losses.get("irpo")(policy, ref, beta=beta), [best_first])
    with pytest.raises(ValueError, match=">= 0"):
        losses.get("irpo")(policy, ref, beta=beta, scores=T([[1.0, -1.0, 0.0]]))


def test_adpo_kl_to_target():
    """ADPO: KL(q || softmax(beta r)) with q = softmax(scores)."""
    policy, ref = T([[1.0, 0.0]]), T([[0.0, 0.0]])
    q = [sig(1.0), 1 - sig(1.0)]  # softmax of scores (1, 0)
    m = [sig(2.0), 1 - sig(2.0)]  # softmax of beta r = (2, 0)
    expected = sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
    close(losses.get("adpo")(policy, ref, beta=2.0, scores=T([[1.0, 0.0]])), [expected])
    one_hot = losses.get("adpo")(policy, ref, beta=2.0)
    close(one_hot, [-math.log(m[0])])


def test_sft_and_z_loss():
    close(losses.get("sft")(T([-6.0]), chosen_lengths=T([3.0])), [2.0])
    logits = T([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # log Z = log 2, log 4
    expected = 1e-2 * (math.log(2) ** 2 + math.log(4) ** 2) / 2
    close(losses.get("z_loss")(logits, weight=1e-2), [expected])
    close(losses.get("z_loss")(logits, T([[1, 0]]), weight=1e-2), [1e-2 * math.log(2) ** 2])


def test_combine_weights_terms():
    mix = losses.combine([("dpo", 1.0), ("sft", 0.5)])
    close(mix(PC, PR, RC, RR, beta=0.5), [-logsig(0.5) + 0.5 * -1.0])
    with pytest.raises(ValueError, match="signature"):
        losses.combine([("tpo", 1.0)])


def test_preference_metrics():
    m = losses.preference_metrics(T([1.0, 0.0]), T([0.0, 1.0]), T([0.0, 0.0]), T([0.0, 0.0]), beta=2.0)
    close(m["rewards/chosen"], 1.0)
    close(m["rewards/margins"], 0.0)
    close(m["implicit_acc"], 0.5)
