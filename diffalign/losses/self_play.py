"""Self-play losses: a policy trained against its previous iterate pi_t on K samples of its own per prompt.

Each takes a pair (chosen, rejected) from the K samples of a prompt, their log-likelihoods under the
policy and a reference, and per-pair inputs estimated from the K samples (win-rates, preference
scores, the previous iterate's log-likelihoods). The round driver (:mod:`diffalign.train.online`) and
the self-play objectives (:mod:`diffalign.objectives.self_play`) supply them; an LM caller passes them
as keyword arguments.

The estimators from a group's K scores live here too, so the diffusion and LM sides share them:
:func:`win_rates` (SPPO's P(y beats pi_t | x)) and :func:`preference_scores` (GPO's s(y beats pi_t | x)).
"""

from __future__ import annotations

import torch

from diffalign.losses._common import f32, logratios, require_reference
from diffalign.losses.pairwise import ipo
from diffalign.losses.registry import PAIRWISE, register

Tensor = torch.Tensor


def win_rates(rewards: Tensor) -> Tensor:
    """(G, K) estimated P(y_i beats pi_t | x) of each of a prompt's K samples: the mean over the group's samples
    j of sigma(r_i - r_j), the Bradley-Terry probability of a reward model's scores (SPPO's compute_prob.py,
    which counts j = i as a draw, 1/2, as here)."""
    rewards = f32(rewards)
    return torch.sigmoid(rewards[:, :, None] - rewards[:, None, :]).mean(dim=2)


def preference_scores(rewards: Tensor) -> Tensor:
    """(G, K) estimated s(y_i beats pi_t | x) = mean over j of s(y_i beats y_j): GPO's general preference score of
    each sample against the group. Given (G, K) scalar rewards, s(y_i beats y_j) = r_i - r_j (a Bradley-Terry
    reward is the rank-2 case of the general preference model), so s = r_i - mean(r); given a (G, K, K) table
    of a general preference model's skew-symmetric scores s(i, j), the mean over j of each row."""
    rewards = f32(rewards)
    if rewards.dim() == 3:
        return rewards.mean(dim=2)
    return rewards - rewards.mean(dim=1, keepdim=True)


def _squared_targets(name: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, target_c: Tensor,
                     target_r: Tensor) -> Tensor:
    """((log pi/pi_t(y_w) - target_w)^2 + (log pi/pi_t(y_l) - target_l)^2) / 2, the form SPPO and GPO share."""
    require_reference(name, rc, rr)
    rw, rl = logratios(pc, rc), logratios(pr, rr)
    return ((rw - f32(target_c)) ** 2 + (rl - f32(target_r)) ** 2) / 2


@register(
    "sppo",
    kind=PAIRWISE,
    summary="SPPO: each sample's log-ratio to pi_t regressed on eta (P(beats pi_t) - 1/2), its estimated win-rate",
    paper="Wu et al. 2024 (SPPO), arXiv 2405.00675, Eq. 4.7 (the authors' trainer, loss_type=sppo)",
)
def sppo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, win_chosen: Tensor,
         win_rejected: Tensor) -> Tensor:
    """``((r_w - (P_w - 1/2) / beta)^2 + (r_l - (P_l - 1/2) / beta)^2) / 2`` with r = log pi_theta / pi_t.

    SPPO's update (Eq. 4.7): log pi_{t+1}(y) / pi_t(y) should equal eta (P(y beats pi_t | x) - 1/2), the
    normaliser approximated by its value eta / 2 at a win-rate of 1/2. eta = 1 / beta; the authors train
    on the highest- and lowest-scored of K = 5 samples with beta 0.001 and halve the sum, as here.
    ``win_chosen``/``win_rejected`` are the two samples' estimated win-rates (:func:`win_rates`); with
    1 and 0 this is half of TRL's ``sppo_hard``.
    """
    return _squared_targets("sppo", pc, pr, rc, rr, (f32(win_chosen) - 0.5) / beta, (f32(win_rejected) - 0.5) / beta)


@register(
    "gpo",
    kind=PAIRWISE,
    summary="GPO: SPPO with general preference scores s(y beats pi_t) in place of win-rates minus 1/2",
    paper="Zhang et al. 2024 (General Preference Model), arXiv 2410.02197, Sec. 5 (GPO)",
)
def gpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, score_chosen: Tensor,
        score_rejected: Tensor) -> Tensor:
    """``((r_w - s_w / beta)^2 + (r_l - s_l / beta)^2) / 2`` with r = log pi_theta / pi_t.

    The general preference model's score s(y beats y' | x) is skew-symmetric, so s(y beats pi_t) averages
    to 0 over pi_t's samples and takes the place of SPPO's P - 1/2 (the normaliser approximated by 0);
    unlike a win-rate it is not bounded in [0, 1], so cyclic (non-Bradley-Terry) preferences keep their
    size. ``score_chosen``/``score_rejected`` come from :func:`preference_scores`.
    """
    return _squared_targets("gpo", pc, pr, rc, rr, f32(score_chosen) / beta, f32(score_rejected) / beta)


@register(
    "inpo_nash",
    kind=PAIRWISE,
    summary="INPO (Nash): IPO's square loss against a geometric mix of the reference and the previous iterate",
    paper="Zhang et al. 2024 (Iterative Nash Policy Optimization), arXiv 2407.00617, Sec. 4, loss L_t",
)
def inpo_nash(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, previous_chosen: Tensor,
              previous_rejected: Tensor, ratio: float = 1.0 / 3.0) -> Tensor:
    """``(h - 1/(2 beta))^2`` with ``h = log pi(y_w)/pi(y_l) - ratio log pi_ref(y_w)/pi_ref(y_l)
    - (1 - ratio) log pi_t(y_w)/pi_t(y_l)``.

    INPO plays online mirror descent with step eta and KL weight tau on the preference game; its iterate
    pi_{t+1} ∝ pi_ref^(tau eta) pi_t^(1 - tau eta) exp(eta P(y beats pi_t)) is the minimiser of this square
    loss over pairs of pi_t's samples (labelled by the preference oracle), so no win-rate needs estimating.
    ``ratio`` = tau eta weighs the base reference (``rc``, ``rr``) against the previous iterate
    (``previous_chosen``, ``previous_rejected``); beta = 1 / eta as in IPO. ratio 1 is IPO against the base,
    ratio 0 IPO against the previous iterate. The default 1/3 is this package's choice, not checked
    against the paper's table of settings.
    """
    require_reference("inpo_nash", rc, rr)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"inpo_nash: ratio = tau * eta must be in [0, 1], got {ratio}")
    mix = lambda base, previous: ratio * f32(base) + (1 - ratio) * f32(previous)  # noqa: E731 - log of the mixed reference
    return ipo(pc, pr, mix(rc, previous_chosen), mix(rr, previous_rejected), beta=beta)
