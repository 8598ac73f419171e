"""BCO's underlying distribution matching as an objective option (Jung et al. 2024, arXiv 2404.04656, Sec. 3.3), for
the unpaired objectives of both families (``lm_kto``, ``diffusion_kto``): the settings, their check, the seeded
sample of each label's rows the classifier is fitted on, and the weights of a batch's undesirable rows. The
classifier itself is :class:`diffalign.losses.udm.UDMClassifier`; what a prompt's embedding is belongs to the family
(the LM's prompt hidden states, the text encoder's conditioning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import ranged
from diffalign.data.pairs import BadRow
from diffalign.errors import UserError
from diffalign.losses import udm_weights
from diffalign.losses.udm import UDMClassifier

Tensor = torch.Tensor


@dataclass
class UDMOptions:
    # BCO's underlying distribution matching (Sec. 3.3): weight each undesirable example by its prompt's density ratio
    # P(desirable | x) / P(undesirable | x), from a classifier fitted before training on the prompts' embeddings;
    # loss bco only
    udm: bool = False
    # prompts of each label the classifier is fitted on (TRL's prompt_sample_size)
    udm_sample_size: int = ranged(1024, "[2, inf)")
    # the weights are clipped to [udm_min_ratio, udm_max_ratio] (TRL's min_density_ratio, max_density_ratio)
    udm_min_ratio: float = ranged(0.5, "(0, inf)")
    udm_max_ratio: float = ranged(10.0, "(0, inf)")


def check_udm(options: UDMOptions, loss: str) -> None:
    if options.udm and loss != "bco":
        raise UserError(f"objective.options.udm reweights BCO's undesirable examples; objective.loss is {loss}: set "
                        "objective.loss=bco or remove it")
    if options.udm_min_ratio > options.udm_max_ratio:
        raise UserError(f"objective.options.udm_min_ratio={options.udm_min_ratio} is above udm_max_ratio="
                        f"{options.udm_max_ratio}")


def sample_by_label(dataset, size: int, seed: int, label_of, decode: bool = False) -> dict[bool, list[Any]]:
    """Up to ``size`` examples of each label (``label_of(example)``), in a seeded order of the usable rows."""
    found: dict[bool, list[Any]] = {True: [], False: []}
    for position in torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist():
        if all(len(v) >= size for v in found.values()):
            break
        try:
            example = dataset.read(position, decode=decode)
        except BadRow:
            continue
        if len(found[label_of(example)]) < size:
            found[label_of(example)].append(example)
    if not found[True] or not found[False]:
        raise UserError("objective.options.udm compares the prompts of desirable and undesirable examples: the data "
                        f"has {len(found[True])} desirable and {len(found[False])} undesirable usable rows")
    return found


def rejected_weights(classifier: UDMClassifier, embeddings: Tensor, desirable: Tensor,
                     options: UDMOptions) -> Tensor:
    """The clipped density ratios of the undesirable rows' prompts, in batch order (the core loss's
    ``rejected_weights``)."""
    return udm_weights(classifier.prob_desirable(embeddings[~desirable]), options.udm_min_ratio, options.udm_max_ratio)
