"""Pairwise preference losses with a reference model.

Signature of every loss here::

    fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, **options) -> Tensor[B]

Inputs are per-example scores s(x) (summed token log-probs for an LM, minus the weighted
denoising error for a diffusion model), shape (B,). With
``r_w = s_theta(y_w) - s_ref(y_w)``, ``r_l = s_theta(y_l) - s_ref(y_l)`` and
``Delta = r_w - r_l``, the DPO implicit reward of an example is ``beta * r``.
The result is the per-example loss, shape (B,), float32; reduce it yourself.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from diffalign.losses._common import (
    EXP_CLAMP,
    exp_clamped,
    f32,
    logratios,
    per_length,
    require_reference,
    soft_logistic,
)
from diffalign.losses.registry import PAIRWISE, register

Tensor = torch.Tensor


def _pair_logratios(name: str, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None):
    require_reference(name, rc, rr)
    return logratios(pc, rc), logratios(pr, rr)


@register(
    "dpo",
    kind=PAIRWISE,
    summary="Direct Preference Optimization: -log sigma(beta * Delta); label_smoothing gives cDPO",
    paper="Rafailov et al. 2023, arXiv 2305.18290, Eq. 7",
)
def dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): ``-log sigma(beta * Delta)``.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO, Mitchell 2023): the
    label says "chosen is better" with probability 1 - eps,
    ``-(1-eps) log sigma(beta Delta) - eps log sigma(-beta Delta)``. (TRL 0.x applied this
    smoothing in its 'sigmoid' loss; TRL 1.x ignores label_smoothing there.)
    """
    rw, rl = _pair_logratios("dpo", pc, pr, rc, rr)
    return soft_logistic(beta * (rw - rl), 1.0 - label_smoothing)


@register(
    "ddo",
    kind=PAIRWISE,
    summary="Direct Discriminative Optimization: -log sigma(beta r(data)) - alpha log(1 - sigma(beta r(sample)))",
    paper="Zheng et al. 2025 (ICML), arXiv 2503.01103: the DDO objective, "
          "-E_data log sigma(beta r) - alpha E_ref log(1 - sigma(beta r)), r = log p_theta / p_ref",
)
def ddo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, alpha: float = 1.0) -> Tensor:
    """DDO (Zheng et al. 2025): the likelihood ratio r = log p_theta / p_ref as a GAN discriminator.

    ``chosen`` is a real data point, ``rejected`` a sample drawn from the reference model:
    ``-log sigma(beta r(x_data)) - alpha log(1 - sigma(beta r(x_ref)))``, i.e.
    ``softplus(-beta r_w) + alpha softplus(beta r_l)``. Unlike DPO the two terms are separate
    (the pair need not share a prompt): data is pushed up, the reference's samples down.
    (The paper's equation number could not be read here; the loss is the method section's
    objective as written above.)
    """
    rw, rl = _pair_logratios("ddo", pc, pr, rc, rr)
    return F.softplus(-beta * rw) + alpha * F.softplus(beta * rl)


@register(
    "cdpo",
    kind=PAIRWISE,
    summary="conservative DPO: DPO against a label flipped with probability eps (default 0.1)",
    paper="Mitchell 2023, 'A note on DPO with noisy preferences'; Rafailov et al. 2023 Eq. 7",
)
def cdpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.1) -> Tensor:
    """cDPO: :func:`dpo` with a default label smoothing eps = 0.1."""
    return dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)


@register(
    "dpo_margin",
    kind=PAIRWISE,
    summary="DPO with a target margin: -log sigma(beta * Delta - margin) (ODPO-style offset)",
    paper="Amini et al. 2024 (ODPO), arXiv 2402.10571, Eq. 5",
)
def dpo_margin(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, margin: Tensor | float = 1.0
) -> Tensor:
    """DPO whose reward difference must exceed a target ``margin`` (scalar or per example).

    ODPO (Eq. 5) sets the offset from the reward difference of the pair; pass it as a tensor.
    """
    rw, rl = _pair_logratios("dpo_margin", pc, pr, rc, rr)
    margin = torch.as_tensor(margin, dtype=rw.dtype, device=rw.device)
    return -F.logsigmoid(beta * (rw - rl) - margin)


@register(
    "dpop",
    kind=PAIRWISE,
    summary="DPO-Positive: DPO plus a penalty when the chosen falls below its reference likelihood",
    paper="Pal et al. 2024 (Smaug / DPOP), arXiv 2402.13228, Eq. 3",
)
def dpop(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, lambda_dpop: float = 50.0) -> Tensor:
    """DPOP (Pal et al. 2024, Eq. 3): ``-log sigma(beta * (r_w - r_l - lambda * max(0, -r_w)))``.

    DPO only asks that ``r_w - r_l`` grow, which it can do while ``r_w`` itself falls (the
    chosen sample becomes *less* likely than under the reference), which the paper shows on
    pairs that differ little. The penalty ``max(0, log pi_ref(y_w) - log pi_theta(y_w))`` is
    zero while the chosen keeps at least its reference likelihood and, below it, pushes the
    chosen up with weight lambda_dpop. The default 50 is the paper's setting for LLM token log-probs; a
    diffusion score has another scale (Diffusion-DPO's beta is in the thousands), so expect to
    retune it there.
    """
    rw, rl = _pair_logratios("dpop", pc, pr, rc, rr)
    return -F.logsigmoid(beta * (rw - rl - lambda_dpop * torch.relu(-rw)))


@register(
    "flex_dpo",
    kind=PAIRWISE,
    summary="Flex-DPO: DPO with its own beta on the rejected log-ratio, which damps the rejected gradient",
    paper="Yan et al. 2025 (3D-Properties), arXiv 2406.07327, Sec. 4.3",
)
def flex_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float,
             beta_rejected_ratio: float = 0.8) -> Tensor:
    """Flex-DPO (3D-Properties, Sec. 4.3): ``-log sigma(beta+ r_w - beta- r_l)``, ``beta+ = beta``.

    The paper traces DPO's three failure modes (drastic drop of the rejected likelihood, degradation into
    suppressing responses, dispersion onto unseen ones) to the gradient ratio
    ``|dl/dpi- / dl/dpi+| = pi+ / pi-`` (its Corollary 1), which grows without bound as the rejected
    probability falls. A separate ``beta- < beta+`` scales that ratio by ``beta- / beta+``, so the rejected
    side is pushed down more gently while the chosen side keeps its pull. ``beta_rejected_ratio`` is
    ``beta- / beta+``, 0.8 by default (the paper sweeps ``beta-`` just below ``beta+`` and finds a small gap
    best, too small a ``beta-`` turning the objective into SFT on the chosen); 1 is DPO.
    """
    rw, rl = _pair_logratios("flex_dpo", pc, pr, rc, rr)
    if beta_rejected_ratio <= 0:
        raise ValueError(f"flex_dpo: beta_rejected_ratio must be > 0 (got {beta_rejected_ratio})")
    return -F.logsigmoid(beta * rw - beta_rejected_ratio * beta * rl)


def madpo_weight(reward_gap: Tensor, *, c_max: float = 2.0, lam: float = 1.0,
                 tau: float = math.log(999.0)) -> Tensor:
    """MADPO's instance weight w(h) of a pair whose reward-model margin (winner minus loser) is ``h``.

    ``c(|h|) = c_min + (c_max - c_min) / (1 + (c_max - 1) / (1 - c_min) exp(lam (|h| - tau)))`` with
    ``c_min = 1 / c_max`` falls from c_max (small margins: hard pairs) through 1 (|h| = tau) to c_min (easy
    pairs); ``w = sigma(c h) / sigma(h)`` turns it into a weight above 1 for hard pairs and below 1 for easy
    ones. Pairs the reward model ranks the other way by more than tau (``h <= -tau``) keep weight 1. As the
    authors' ``MADPOLoss`` (c_max 2, c_min 1/2, lambda 1, tau = log(0.999/0.001) in their notebook).
    """
    if not c_max > 1.0:
        raise ValueError(f"madpo needs c_max > 1 (c_min = 1/c_max), got {c_max}")
    h = f32(reward_gap)
    c_min = 1.0 / c_max
    c = c_min + (c_max - c_min) / (1.0 + (c_max - 1.0) / (1.0 - c_min) * torch.exp(lam * (h.abs() - tau)))
    return torch.where(h > -tau, torch.sigmoid(c * h) / torch.sigmoid(h), torch.ones_like(h))


@register(
    "madpo",
    kind=PAIRWISE,
    summary="Margin-Adaptive DPO: DPO weighted per pair by w(h), h the reward model's margin (data.reward_columns)",
    paper="Rho 2025 (MADPO), arXiv 2510.05342, Eq. 4 and the weight w(h) of the authors' loss_functions.py",
)
def madpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, reward_gap: Tensor, c_max: float = 2.0,
          lam: float = 1.0, tau: float = math.log(999.0)) -> Tensor:
    """MADPO: ``-w(h_i) log sigma(beta Delta_i)``, the DPO loss of each pair times :func:`madpo_weight` of its
    reward-model margin ``h_i`` (``reward_gap``: the winner's score minus the loser's, from a separately
    trained reward model: in a config ``data.reward_columns``). The weight is a constant of the step."""
    weights = madpo_weight(reward_gap, c_max=c_max, lam=lam, tau=tau).to(f32(pc).device)
    return weights * dpo(pc, pr, rc, rr, beta=beta)


@register(
    "da_dpo",
    kind=PAIRWISE,
    summary="DA-DPO: DPO with each pair's beta scaled by alpha (|score gap| + 1), its difficulty by a scorer",
    paper="DA-DPO: Cost-efficient Difficulty-aware Preference Optimization for Reducing MLLM Hallucination (TMLR "
          "2025), the difficulty weight of the authors' llava/train/da_dpo.py (github Artanic30/DA-DPO, db_alpha 1)",
)
def da_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, reward_gap: Tensor,
           alpha: float = 1.0) -> Tensor:
    """``-log sigma(beta alpha (|g_i| + 1) Delta_i)``, ``g_i`` the gap between a scorer's scores of the two
    responses (the authors use CLIP scores of the image-text pairs; ``data.reward_columns`` in a config).

    The difficulty scale sits inside the sigmoid, so it is a per-pair beta: pairs the scorer finds easy
    (a large gap) are held to the reference more tightly and saturate sooner, hard pairs (a small gap)
    keep the plain beta longer. As the authors' ``CustomDPOTrainer.dpo_loss``.
    """
    scale = alpha * (f32(reward_gap).abs() + 1.0)
    rw, rl = _pair_logratios("da_dpo", pc, pr, rc, rr)
    return -F.logsigmoid(beta * scale.to(rw.device) * (rw - rl))


@register(
    "hinge",
    kind=PAIRWISE,
    summary="SLiC hinge: relu(1 - beta * Delta)",
    paper="Zhao et al. 2023 (SLiC-HF), arXiv 2305.10425, Eq. 1",
)
def hinge(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> Tensor:
    """SLiC-HF calibration loss with the reference log-ratio (TRL 'hinge'): ``max(0, 1 - beta Delta)``."""
    rw, rl = _pair_logratios("hinge", pc, pr, rc, rr)
    return torch.relu(1.0 - beta * (rw - rl))


@register(
    "ipo",
    kind=PAIRWISE,
    summary="IPO: (Delta - 1/(2 beta))^2, log-ratios averaged per token when lengths are given",
    paper="Azar et al. 2023, arXiv 2310.12036, Eq. 17",
)
def ipo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with tau = beta: ``(Delta - 1/(2 tau))^2``.

    TRL (and the IPO authors) divide each log-ratio by its completion length; pass
    ``chosen_lengths``/``rejected_lengths`` for that. Diffusion scores need no lengths.
    """
    rw, rl = _pair_logratios("ipo", pc, pr, rc, rr)
    delta = per_length(rw, chosen_lengths) - per_length(rl, rejected_lengths)
    return (delta - 1.0 / (2.0 * beta)) ** 2


@register(
    "dpo_norm",
    kind=PAIRWISE,
    summary="DPO on per-token averaged log-ratios (TRL 'sigmoid_norm')",
    paper="Rafailov et al. 2023 Eq. 7 with length normalisation as in TRL",
)
def dpo_norm(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """``-log sigma(beta * (r_w/|y_w| - r_l/|y_l|))``."""
    rw, rl = _pair_logratios("dpo_norm", pc, pr, rc, rr)
    return -F.logsigmoid(beta * (per_length(rw, chosen_lengths) - per_length(rl, rejected_lengths)))


@register(
    "robust",
    kind=PAIRWISE,
    summary="robust DPO (rDPO): unbiased loss under label flips with rate eps",
    paper="Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8",
)
def robust(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.1) -> Tensor:
    """rDPO (Eq. 8): ``[-(1-eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps)``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    rw, rl = _pair_logratios("robust", pc, pr, rc, rr)
    z = beta * (rw - rl)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register(
    "exo",
    kind=PAIRWISE,
    summary="EXO-pref: reverse KL between the policy's pair distribution and a smoothed label",
    paper="Ji et al. 2024 (EXO), arXiv 2402.00856, Eq. 16",
)
def exo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 1e-3) -> Tensor:
    """EXO-pref for K = 2 (Eq. 16): ``KL(softmax(beta r) || [1-eps, eps])`` over {chosen, rejected}."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"EXO needs 0 < label_smoothing < 1, got {label_smoothing}")
    rw, rl = _pair_logratios("exo", pc, pr, rc, rr)
    z = beta * (rw - rl)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (
        log_ql - math.log(label_smoothing)
    )


@register(
    "nca",
    kind=PAIRWISE,
    summary="NCA pair loss: absolute likelihood of the chosen up, both down against it",
    paper="Chen et al. 2024 (NCA), arXiv 2402.05369, Eq. 11",
)
def nca(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> Tensor:
    """NCA (K = 2): ``-log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)``."""
    rw, rl = _pair_logratios("nca", pc, pr, rc, rr)
    return -F.logsigmoid(beta * rw) - 0.5 * F.logsigmoid(-beta * rw) - 0.5 * F.logsigmoid(-beta * rl)


@register(
    "bco_pair",
    kind=PAIRWISE,
    summary="BCO on pairs: chosen classified as good, rejected as bad, with a reward shift delta",
    paper="Jung et al. 2024 (BCO), arXiv 2404.04656, Eq. 6",
)
def bco_pair(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, delta: Tensor | float = 0.0
) -> Tensor:
    """``-log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta))``.

    ``delta`` is the reward shift (the running mean of the implicit rewards in the paper,
    see :class:`diffalign.losses.unpaired.RewardShift`); TRL's 'bco_pair' uses delta = 0.
    """
    rw, rl = _pair_logratios("bco_pair", pc, pr, rc, rr)
    return -F.logsigmoid(beta * rw - delta) - F.logsigmoid(-(beta * rl - delta))


@register(
    "sppo_hard",
    kind=PAIRWISE,
    summary="SPPO with hard probabilities: r_w -> +1/(2 beta), r_l -> -1/(2 beta) by squares",
    paper="Wu et al. 2024 (SPPO), arXiv 2405.00675, Eq. 4.7 with P in {0, 1}",
)
def sppo_hard(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> Tensor:
    """``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``: SPPO's square loss with P(win) = 1 and 0."""
    rw, rl = _pair_logratios("sppo_hard", pc, pr, rc, rr)
    return (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2


@register(
    "apo_zero",
    kind=PAIRWISE,
    summary="APO-zero: chosen likelihood up, rejected down (chosen better than the model)",
    paper="D'Oosterlinck et al. 2024 (APO), arXiv 2408.06266, Eq. 7",
)
def apo_zero(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> Tensor:
    """``(1 - sigma(beta r_w)) + sigma(beta r_l)``."""
    rw, rl = _pair_logratios("apo_zero", pc, pr, rc, rr)
    return (1 - torch.sigmoid(beta * rw)) + torch.sigmoid(beta * rl)


@register(
    "apo_down",
    kind=PAIRWISE,
    summary="APO-down: both likelihoods down, the rejected more (chosen worse than the model)",
    paper="D'Oosterlinck et al. 2024 (APO), arXiv 2408.06266, Eq. 8",
)
def apo_down(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> Tensor:
    """``sigma(beta r_w) + (1 - sigma(beta (r_w - r_l)))``."""
    rw, rl = _pair_logratios("apo_down", pc, pr, rc, rr)
    return torch.sigmoid(beta * rw) + (1 - torch.sigmoid(beta * (rw - rl)))


def _aot(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return soft_logistic(beta * delta, 1.0 - label_smoothing)


@register(
    "aot",
    kind=PAIRWISE,
    summary="AOT (paired): DPO on sorted policy vs sorted reference log-ratio margins in the batch",
    paper="Melnyk et al. 2024 (AOT), arXiv 2406.05882, Eq. 9",
)
def aot(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Distributional alignment via optimal transport (paired form).

    Sorts ``s_theta(y_w) - s_theta(y_l)`` and ``s_ref(y_w) - s_ref(y_l)`` over the batch and
    applies the logistic loss to their sorted differences: first-order stochastic dominance
    of the policy's margin distribution. Example i of the result is the i-th quantile.
    """
    require_reference("aot", rc, rr)
    policy_margin, _ = torch.sort(logratios(pc, None) - logratios(pr, None), dim=0)
    ref_margin, _ = torch.sort(logratios(rc, None) - logratios(rr, None), dim=0)
    return _aot(policy_margin - ref_margin, beta, label_smoothing)


@register(
    "aot_unpaired",
    kind=PAIRWISE,
    summary="AOT (unpaired): sorted chosen log-ratios must dominate sorted rejected ones",
    paper="Melnyk et al. 2024 (AOT), arXiv 2406.05882, Eq. 8",
)
def aot_unpaired(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """Unpaired AOT: logistic loss on ``sort(r_w) - sort(r_l)`` over the batch."""
    rw, rl = _pair_logratios("aot_unpaired", pc, pr, rc, rr)
    return _aot(torch.sort(rw, dim=0)[0] - torch.sort(rl, dim=0)[0], beta, label_smoothing)


@register(
    "discopop",
    kind=PAIRWISE,
    summary="DiscoPOP log-ratio modulated loss: logistic/exponential blend gated by sigma(z/tau)",
    paper="Chan et al. 2024 (DiscoPOP), arXiv 2406.08414, Eq. 5",
)
def discopop(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, tau: float = 0.05) -> Tensor:
    """``(1 - sigma(z/tau)) * (-log sigma(z)) + sigma(z/tau) * exp(-z)`` with z = beta Delta.

    The exponential branch is evaluated as ``exp(-z + log sigma(z/tau))`` so that a huge
    negative z (where the gate is ~0 and exp(-z) overflows) stays finite.
    """
    rw, rl = _pair_logratios("discopop", pc, pr, rc, rr)
    z = beta * (rw - rl)
    gate = torch.sigmoid(z / tau)
    exp_branch = torch.exp((-z + F.logsigmoid(z / tau)).clamp(max=EXP_CLAMP))
    return -F.logsigmoid(z) * (1 - gate) + exp_branch


FDivergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]
F_DIVERGENCES = get_args(FDivergence)


def f_divergence_scores(logratio: Tensor, divergence: FDivergence, alpha: float = 0.5) -> Tensor:
    """f'(pi_theta/pi_ref) for the f-divergence regularised DPO (Wang et al. 2023, Table 1).

    reverse_kl: log u; forward_kl: 1 - 1/u; js: log(2u/(1+u)); alpha: (u^(alpha-1) - 1)/(alpha-1),
    with u = exp(logratio). Exponents are clamped at +-80 so the scores stay finite.
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1.0 - exp_clamped(-logratio)
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(logratio)
    if divergence == "alpha":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        return (exp_clamped((alpha - 1.0) * logratio) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {divergence!r}; choose one of {', '.join(F_DIVERGENCES)}")


@register(
    "f_dpo",
    kind=PAIRWISE,
    summary="f-DPO: DPO with the reverse-KL regulariser replaced by forward KL, JS or alpha-divergence",
    paper="Wang et al. 2023 (f-DPO), arXiv 2309.16240, Eq. 10 / Table 1",
)
def f_dpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    divergence: FDivergence = "reverse_kl",
    alpha: float = 0.5,
) -> Tensor:
    """``-log sigma(beta [f'(u_w) - f'(u_l)])`` (Eq. 10), u = pi_theta/pi_ref; reverse_kl is DPO."""
    rw, rl = _pair_logratios("f_dpo", pc, pr, rc, rr)
    z = f_divergence_scores(rw, divergence, alpha) - f_divergence_scores(rl, divergence, alpha)
    return -F.logsigmoid(beta * z)


@register(
    "rpo",
    kind=PAIRWISE,
    summary="RPO: DPO plus alpha times the per-token NLL of the chosen response",
    paper="Pang et al. 2024 (Iterative RPO), arXiv 2404.19733, Eq. 2; the same form is RPO of Liu et al. 2024 "
          "(Provably Mitigating Overoptimization in RLHF), arXiv 2405.16436, its SFT-regularised DPO",
)
def rpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    chosen_lengths: Tensor | None = None,
) -> Tensor:
    """``-log sigma(beta Delta) - alpha * log pi_theta(y_w|x) / |y_w|`` (Eq. 2).

    ``chosen_lengths`` normalises the NLL per token (the paper's |y_w|); for diffusion scores
    the NLL term is minus the chosen score, i.e. the chosen's denoising error.
    """
    return dpo(pc, pr, rc, rr, beta=beta) - alpha * per_length(logratios(pc, None), chosen_lengths)
