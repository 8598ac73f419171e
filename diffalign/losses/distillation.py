"""Distillation losses on (student, teacher) logits, and a classification loss on logits alone.

Signatures::

    distillation:    fn(student_logits, teacher_logits, mask=None, *, labels=None, **options) -> Tensor[B]
                     (aligndistil also takes reference_logits, the second model its teacher is built from)
    classification:  fn(logits, labels, mask=None, **options) -> Tensor[B]

Logits are (B, V) for one prediction per example (an image classifier) or (B, T, V) for one per
token (a causal LM, its logits already shifted to line up with ``labels``); ``mask`` (B, T) marks
the positions that count (completion tokens) and the per-example loss is the mean over them, as
``z_loss`` does. ``labels`` are class (token) indices, (B,) or (B, T). The teacher's logits are
treated as constants (detached). Every loss works in float32.

These are the seeds' distillation papers: they train a student to take on a teacher's
distribution, the step before (or beside) preference training in LLaVA-MoD, and the whole of it in AlignDistil.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses._common import f32
from diffalign.losses.registry import CLASSIFICATION, DISTILLATION, register

Tensor = torch.Tensor
STD_EPS = 1e-7  # the LSKD authors' guard against a zero standard deviation


def _per_example(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """(B,) or (B, T) losses -> (B,): the mean over the masked positions of each example."""
    if per_position.dim() == 1:
        return per_position
    if mask is None:
        return per_position.mean(dim=-1)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _check_shapes(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape or student.dim() not in (2, 3):
        raise ValueError("distillation losses take student and teacher logits of one shape, (B, V) or (B, T, V); "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")


def standardise(logits: Tensor) -> Tensor:
    """Z-score over the classes: (z - mean) / (std + 1e-7), std with Bessel's correction as the authors' code."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + STD_EPS)


@register(
    "ls_kd",
    kind=DISTILLATION,
    needs_reference=False,
    summary="logit-standardised KD: tau^2 KL(softmax(Z(teacher)/tau) || softmax(Z(student)/tau)), Z the z-score",
    paper="Sun et al. 2024 (Logit Standardization in KD, CVPR), arXiv 2403.01427, Algorithm 1; base temperature 2 as the authors' runs",
)
def ls_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
          labels: Tensor | None = None, temperature: float = 2.0) -> Tensor:
    """KD on z-scored logits, so that the student matches the teacher's logit relations, not their range.

    Each logit vector is standardised over its classes before the temperature softmax (the paper's
    Z-score pre-process, which makes the effective temperature the logits' own standard deviation times
    ``temperature``); the loss is the temperature-squared KL of the student from the teacher (Hinton et
    al.'s scaling, kept by the authors). ``temperature`` 2 is the base temperature of the authors' CIFAR-100
    runs (``--base-temp 2``, with the KD term weighted 9 beside the cross-entropy, a weight that is the
    caller's). ``labels`` are not used (the cross-entropy on labels is a separate term in the paper).
    """
    _check_shapes(student_logits, teacher_logits)
    student = standardise(f32(student_logits)) / temperature
    teacher = standardise(f32(teacher_logits).detach()) / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="none", log_target=True)
    return _per_example(kl.sum(-1) * temperature**2, mask)


@register(
    "pld",
    kind=DISTILLATION,
    needs_reference=False,
    summary="Plackett-Luce distillation: the true class first, then the teacher's order, each rank weighted by the teacher",
    paper="Bassam et al. 2025 (PLD: A Choice-Theoretic List-Wise Knowledge Distillation), arXiv 2506.12542, Section 3",
)
def pld(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
        labels: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """The weighted Plackett-Luce (ListMLE) loss of the teacher-optimal ranking under the student's logits.

    The ranking pi* puts the label first and the other classes in descending teacher logit. With the
    student's logits s in that order, the loss is

        sum_k alpha_k [ log sum_{j >= k} exp(s_{pi*_j}) - s_{pi*_k} ],

    alpha_k the teacher's softmax probability (at ``temperature``) of the class ranked k-th: each
    choice counts by the teacher's own confidence in it. With all alpha on the label it is the
    cross-entropy, which the loss subsumes (no separate cross-entropy term is added). ``labels`` are
    required.
    """
    _check_shapes(student_logits, teacher_logits)
    if labels is None:
        raise ValueError("pld ranks the true label first: pass labels (class or token indices)")
    student, teacher = f32(student_logits), f32(teacher_logits).detach()
    # teacher-optimal order: the label first (its key raised above every logit), then descending teacher logits
    key = teacher.scatter(-1, labels.unsqueeze(-1), float("inf"))
    order = key.argsort(dim=-1, descending=True)
    ranked = student.gather(-1, order)
    alpha = F.softmax(teacher / temperature, dim=-1).gather(-1, order)
    # log sum_{j >= k} exp(s_j): a reversed cumulative logsumexp
    tail = ranked.flip(-1).logcumsumexp(dim=-1).flip(-1)
    return _per_example((alpha * (tail - ranked)).sum(-1), mask)


@register(
    "mimic_kd",
    kind=DISTILLATION,
    needs_reference=False,
    summary="LLaVA-MoD mimic distillation: cross-entropy of the student's token distribution against the teacher's",
    paper="Shu et al. 2025 (LLaVA-MoD, ICLR), arXiv 2408.15881, mimic distillation (the authors' align_trainer.py)",
)
def mimic_kd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
             labels: Tensor | None = None) -> Tensor:
    """``-sum_v p_teacher(v) log p_student(v)`` per position, averaged over the masked positions.

    This is KL(p_teacher || p_student) plus the teacher's entropy, a constant: the same gradient as
    the forward KL, and the quantity the authors' ``compute_align_loss`` computes (their mask is
    the response tokens; their mean is over every token of the batch, this one per sequence).
    ``labels`` are not used (the authors add the ordinary SFT loss beside it).
    """
    _check_shapes(student_logits, teacher_logits)
    log_student = F.log_softmax(f32(student_logits), dim=-1)
    teacher = F.softmax(f32(teacher_logits).detach(), dim=-1)
    cross = -(teacher * log_student.masked_fill(torch.isinf(log_student), 0.0)).sum(-1)
    return _per_example(cross, mask)


@register(
    "aligndistil",
    kind=DISTILLATION,
    summary="AlignDistil: reverse KL to a per-token extrapolation of a DPO teacher past a reference, adaptive by their gap",
    paper="Zhang et al. 2025 (AlignDistil, ACL), arXiv 2503.02832, the adaptive token-level distillation of the authors' "
          "aligndistil_offpolicy_trainer.py (reward_boost_type aligndistil, beta 0.1, beta2 10 as their script)",
)
def aligndistil(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                labels: Tensor | None = None, reference_logits: Tensor, beta: float = 0.1, beta2: float = 10.0,
                temperature: float = 1.0) -> Tensor:
    """Token-level alignment as distillation of a synthetic teacher built from a DPO model and a reference.

    AlignDistil reads the DPO reward ``beta (log pi_dpo - log pi_ref)`` token by token: the RLHF optimum at
    each position is then the distribution whose logits extrapolate the DPO model's past the reference's.
    With ``z_T`` the DPO model's logits (``teacher_logits``) and ``z_R`` the reference's (``reference_logits``:
    in the paper a *reverse* DPO model, trained on the swapped pairs; the plain reference also works), each
    position gets

        tvd = sum_v |p_T(v) - p_R(v)|,        w = beta2 * tvd + 1e-3,
        z*  = w (z_T - z_R) + z_T,             loss_t = (beta / w) KL(p_S || softmax(z* / temperature)),

    so positions where the two models disagree (a large total variation) extrapolate further and are held
    less tightly (the adaptive token weight of the paper). The per-sequence loss is the mean over the
    masked tokens (the authors' ``--reward_len_norm``, on in their shipped script). Both teacher logits are
    constants; only the student's reverse KL carries the gradient. ``labels`` are not used.
    """
    _check_shapes(student_logits, teacher_logits)
    _check_shapes(student_logits, reference_logits)
    student = f32(student_logits)
    teacher, reference = f32(teacher_logits).detach(), f32(reference_logits).detach()
    tvd = (F.softmax(teacher, dim=-1) - F.softmax(reference, dim=-1)).abs().sum(-1, keepdim=True)
    weight = beta2 * tvd + 1e-3
    target = F.log_softmax((weight * (teacher - reference) + teacher) / temperature, dim=-1)
    log_student = F.log_softmax(student, dim=-1)
    reverse_kl = (log_student.exp() * (log_student - target)).sum(-1)
    return _per_example(reverse_kl * (beta / weight.squeeze(-1)), mask)


@register(
    "spherical_z_loss",
    kind=CLASSIFICATION,
    needs_reference=False,
    summary="spherical Z-loss: softplus(a (b - z_c)) / a on the z-scored target logit; shift and scale invariant",
    paper="de Brebisson and Vincent 2016 (The Z-loss: a shift and scale invariant classification loss belonging "
          "to the Spherical Family), arXiv 1604.08859, Section 3; not the PaLM z-loss (`z_loss`)",
)
def spherical_z_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                     a: float = 1.0, b: float = 0.0) -> Tensor:
    """``(1/a) log(1 + exp(a (b - z_c)))``, z_c = (o_c - mean(o)) / std(o), std without Bessel's correction.

    A classification loss in the spherical family: it depends on the logits only through their sum, their
    sum of squares and the target's logit, so adding a constant to the logits or scaling them changes
    nothing. ``a`` sets how sharp the softplus is and ``b`` where it bends; the paper tunes both per
    task (and its code adapts them during training), so 1 and 0 here are neutral starting values, not
    the paper's. Not to be confused with ``z_loss`` (PaLM's (log Z)^2 regulariser).
    """
    if a <= 0:
        raise ValueError(f"spherical_z_loss needs a > 0; got a={a}")
    o = f32(logits)
    z = (o - o.mean(dim=-1, keepdim=True)) / o.std(dim=-1, keepdim=True, correction=0).clamp(min=STD_EPS)
    z_c = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return _per_example(F.softplus(a * (b - z_c)) / a, mask)
