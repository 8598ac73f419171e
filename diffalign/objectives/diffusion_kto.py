"""Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility",
arXiv 2404.04465): per-image binary feedback (liked or not) instead of preference pairs.

Each captioned image is noised at its own random (t, noise) and scored with the denoising
likelihood proxy, r = s_theta(x) - s_ref(x) with s = -w(t) * mean squared error. KTO's value
function (Ethayarajh et al. 2024, Eq. 8) then applies per image:

    desirable:    lambda_D * (1 - sigma(beta * (r - z_0)))
    undesirable:  lambda_U * (1 - sigma(beta * (z_0 - r)))

with the reference point z_0 = max(0, mean r over the batch), detached: the ``kto`` core loss with
that estimate passed as its ``kl``. The authors' code (``train_kto_sd_v1.5.py`` with its defaults
``--halo sigmoid --bce_offset none``) computes the same, with beta = 1000 (``--beta_dpo``) and
lambda_D = lambda_U = 1. As there, the batch mean in z_0 is averaged over the processes (the
global batch), and ``data.positive_ratio`` draws liked images with a set probability, their
``--positive_ratio`` (0.8 in their example; the data's own mix by default here). Other unpaired core
losses (bco, with its running reward shift; npo) are one config key away; with bco, ``objective.options.udm``
adds BCO's underlying distribution matching (Jung et al. 2024, Sec. 3.3: each undesirable image weighted by its
caption's density ratio, from a classifier fitted before training on the text encoders' embeddings of the captions,
:mod:`diffalign.objectives.udm`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.errors import UserError
from diffalign.losses.udm import UDMClassifier
from diffalign.objectives.offline import OfflineDenoisingObjective
from diffalign.objectives.udm import UDMOptions, check_udm, rejected_weights, sample_by_label

Tensor = torch.Tensor


class DiffusionKTO(OfflineDenoisingObjective):
    """Offline objective on single captioned images with binary labels (``data.label_column``)."""

    paper = "Li et al. 2024, arXiv 2404.04465"

    dataset = "labelled_images"
    loss_kinds = ("unpaired",)
    Options = UDMOptions

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.udm = self.options_of(config)
        self.classifier = UDMClassifier() if self.udm.udm else None

    @classmethod
    def check_config(cls, config) -> None:
        check_udm(cls.options_of(config.objective), config.objective.loss)
        if cls.options_of(config.objective).udm and config.data.source_columns:
            raise UserError("objective.options.udm embeds each caption alone; an edit's prompt reads its source "
                            "images (data.source_columns), which the classifier does not see: remove one of them")

    def attach(self, denoiser) -> list[Any]:
        """The running statistics, and BCO's UDM classifier, go into the checkpoints."""
        return [*super().attach(denoiser), *([self.classifier] if self.classifier is not None else [])]

    def fit_to_data(self, dataset, embed_captions, seed: int) -> None:
        """BCO's UDM classifier (when ``udm``), fitted on up to ``udm_sample_size`` captions of each label, drawn with
        the run's seed and embedded by the text encoders (:meth:`Conditioning.prompt_embedding`)."""
        if self.classifier is None:
            return
        found = sample_by_label(dataset, self.udm.udm_sample_size, seed, lambda e: e.preference > 0.5)
        embedded = {label: torch.cat([embed_captions([e.caption for e in examples[i:i + 32]])
                                      for i in range(0, len(examples), 32)]) for label, examples in found.items()}
        self.classifier.fit(embedded[True], embedded[False])

    def scored_inputs(self, backbone, group) -> dict[str, Tensor]:
        """Every image's prompt embedding, for BCO's UDM weights (when ``udm``)."""
        if self.classifier is None:
            return {}
        return {"udm_embeddings": group.cond.prompt_embedding().detach()}

    def per_group_loss(self, policy: Tensor, reference: Tensor | None, *, preference: Tensor | None,
                       scores: Tensor | None, options: dict[str, Any]) -> Tensor:
        """(B,) loss of the images, in batch order, from the unpaired loss's (liked, then not liked) losses."""
        liked = preference > 0.5
        options = dict(options)
        embeddings = options.pop("udm_embeddings", None)
        if embeddings is not None and bool((~liked).any()):
            options["rejected_weights"] = rejected_weights(self.classifier, embeddings, liked, self.udm)

        def split(scores: Tensor | None) -> list[Tensor | None]:  # an empty side is None for the core loss
            parts = [None, None] if scores is None else [scores[:, 0][liked], scores[:, 0][~liked]]
            return [part if part is not None and len(part) else None for part in parts]

        (pc, pr), (rc, rr) = split(policy), split(reference)
        loss = self.spec.fn(pc, pr, rc, rr, beta=self.beta, **options)
        per_image = policy.new_zeros(len(policy), dtype=loss.dtype)
        if len(loss) == len(policy):
            per_image[liked], per_image[~liked] = loss[: int(liked.sum())], loss[int(liked.sum()):]
        else:  # NPO without its retain term scores the undesirable images only
            per_image[~liked] = loss
        return per_image

    def reward_metrics(self, policy: Tensor, reference: Tensor, *, preference: Tensor | None,
                       options: dict[str, Any]) -> dict[str, Tensor]:
        """Mean implicit reward of the liked and of the other images, and the fraction of images whose
        reward lies on their label's side of the batch's reference point (the authors' logged accuracy; an
        image exactly at the reference point counts one half, as a tie in every pairwise objective)."""
        r = (policy - reference)[:, 0].float()
        liked = (preference > 0.5).float()
        z0 = options["kl"] if "kl" in options else self.reference_point(policy, reference)  # the kto loss's one
        agree = torch.where(liked.bool(), r > z0, r < z0).float() + 0.5 * (r == z0).float()
        extra = {}
        if "udm_embeddings" in options and bool((liked < 1).any()):
            extra["udm_weight"] = rejected_weights(self.classifier, options["udm_embeddings"], liked.bool(),
                                                   self.udm).mean()
        return {
            **extra,
            "rewards/desirable": self.beta * (r * liked).sum() / liked.sum().clamp(min=1.0),
            "rewards/undesirable": self.beta * (r * (1 - liked)).sum() / (1 - liked).sum().clamp(min=1.0),
            "implicit_acc": agree.mean(),
        }
