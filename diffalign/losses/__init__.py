"""The preference-loss core: pure functions of per-example scores, one registry by name.

>>> from diffalign import losses
>>> loss = losses.get("dpo")(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)

Call conventions by kind (see each module's docstring):

- pairwise, soft-label, unpaired, reference-free, ``sft``:
  ``fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, **options)``
- self-play pairwise losses (``sppo``, ``gpo``, ``inpo_nash``) take the pairwise arguments plus per-pair
  inputs estimated from a prompt's K samples (win-rates, preference scores, the previous iterate's scores)
- listwise: ``fn(policy, reference, *, beta, scores=None, **options)`` on (B, K) scores
- ``z_loss``: ``fn(logits, mask=None, *, weight)``
- distillation: ``fn(student_logits, teacher_logits, mask=None, *, labels=None, **options)``;
  classification (``spherical_z_loss``): ``fn(logits, labels, mask=None, **options)``

Every function returns the per-example loss; reduction is the caller's. Scores are any
per-sample log-likelihood or proxy, higher = more likely: summed token log-probs for a text
LM, minus the weighted denoising error for a diffusion model.
"""

from diffalign.losses import (
    distillation,
    listwise,
    noisy_labels,
    pairwise,
    reference_free,
    regularisers,
    self_play,
    soft,
    token_level,
    unpaired,
)
from diffalign.losses.metrics import combine, preference_metrics
from diffalign.losses.registry import (
    KINDS,
    LossSpec,
    UnknownLossError,
    get,
    names,
    spec,
    specs,
)
from diffalign.losses.noisy_labels import LabelReliability
from diffalign.losses.pairwise import madpo_weight
from diffalign.losses.unpaired import RewardShift, udm_weights

__all__ = [
    "KINDS",
    "LabelReliability",
    "LossSpec",
    "RewardShift",
    "UnknownLossError",
    "combine",
    "distillation",
    "get",
    "listwise",
    "madpo_weight",
    "names",
    "noisy_labels",
    "pairwise",
    "preference_metrics",
    "reference_free",
    "regularisers",
    "self_play",
    "soft",
    "spec",
    "specs",
    "token_level",
    "udm_weights",
    "unpaired",
]
