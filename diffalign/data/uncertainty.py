"""Reliable pairs by an estimator's Monte-Carlo-dropout uncertainty (UPO, Wang et al. 2025, AAAI; arXiv 2409.11212).

Pairs labelled by a reward model (or by people) carry noise. UPO keeps the pairs an *estimator* agrees with and is
sure of: a binary sequence classifier, trained beforehand to say which of two responses is better, reads each
pair as one text (the query, then the labelled winner as "Response #1" and the loser as "Response #2") and runs
``passes`` times with its dropout on. From the passes' class probabilities p_t (T, N, 2):

1. a pair whose majority prediction is "Response #2 is better" disagrees with its label and is dropped as noise;
2. the rest are sampled without replacement, ``keep`` of them (the authors' bald_rate, at most 0.5: 0.5 in their
   runs), with probability proportional to their certainty ``max(0, 1 - BALD)``, where
   ``BALD = H(mean_t p_t) - mean_t H(p_t)`` is the mutual information between the prediction and the estimator's
   weights (Houlsby et al. 2011): how much the dropout masks disagree.

As the authors' ``inference/estimating`` (majority vote, ``sample_by_bald_easiness``; 10 passes). The sample is
drawn from a generator seeded by the run's seed, so every process and every resume keeps the same pairs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from diffalign.errors import UserError

Tensor = torch.Tensor

TEMPLATE = ("You are a good preference labeler. Give you one query from human and two candidate responses answered by "
            "the same assistant, your job is to find the better response which is more helpful, harmless for the "
            "human query.\n\nQ: {query}\n\n\nResponse #1: {first} \n\n\nReponse #2: {second}")


def estimation_text(query: str, first: str, second: str) -> str:
    """The estimator's input for a pair, in the authors' template (their spelling kept: an estimator trained on it
    reads it as it was trained)."""
    return TEMPLATE.format(query=query, first=first, second=second)


def bald(probs: Tensor) -> Tensor:
    """(N,) BALD of (T, N, C) class probabilities from T dropout passes: H(mean p) - mean H(p), in nats."""
    probs = probs.double()
    expected_entropy = -(probs * torch.log(probs + 1e-10)).sum(-1).mean(0)
    mean = probs.mean(0)
    return -(mean * torch.log(mean + 1e-10)).sum(-1) - expected_entropy


def mc_dropout_probs(model: torch.nn.Module, batches: Iterable[dict[str, Tensor]], passes: int) -> Tensor:
    """(passes, N, C) softmax probabilities of a sequence classifier run ``passes`` times over ``batches`` with its
    dropout on (train mode, no gradient), as the authors' ``mc_estimation``."""
    batches = list(batches)
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            runs = [torch.cat([model(**batch).logits.float().softmax(-1) for batch in batches]) for _ in range(passes)]
    finally:
        model.train(was_training)
    return torch.stack(runs)


def reliable_pairs(probs: Tensor, keep: float, generator: torch.Generator) -> tuple[list[int], int]:
    """The pairs to train on, and how many were dropped as noise; see the module docstring.

    Args:
        probs: (T, N, 2) class probabilities, class 0 "Response #1 (the labelled winner) is better".
        keep: the share of the agreeing pairs to sample, in (0, 1].
    """
    votes = probs.argmax(-1)  # (T, N)
    agree = (votes == 0).sum(0) >= (votes != 0).sum(0)  # the majority; a tie agrees, as argmax(bincount) gives 0
    candidates = agree.nonzero().flatten()
    noise = len(agree) - len(candidates)
    count = int(len(candidates) * keep)
    if count == 0:
        return [], noise
    certainty = (1.0 - bald(probs[:, candidates])).clamp(min=0.0)
    if certainty.sum() <= 0:
        certainty = torch.ones_like(certainty)
    chosen = torch.multinomial(certainty.float(), count, replacement=False, generator=generator)
    return sorted(candidates[chosen].tolist()), noise


def _plain(value) -> str:
    """A prompt or completion as plain text: itself, or its messages' contents one per line."""
    return value if isinstance(value, str) else "\n".join(str(message.get("content", "")) for message in value)


def keep_reliable_pairs(dataset, estimator: str, *, passes: int, keep: float, seed: int, batch_size: int = 16) -> None:
    """Narrow a :class:`~diffalign.data.text.TextPairDataset` to UPO's reliable pairs by the sequence classifier at
    ``estimator``, and say what was kept; a bad row is counted as the dataset counts them and left out."""
    from diffalign.data.pairs import BadRow
    from diffalign.lm.loading import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(estimator, "data.estimator")
    if model.config.num_labels != 2:
        raise UserError(f"data.estimator {estimator}: a classifier of 2 labels (0: Response #1 is better) is needed, "
                        f"this one has {model.config.num_labels}")
    positions, texts = [], []
    for position in range(len(dataset)):
        try:
            prompt, chosen, rejected = dataset.pair(position)
        except BadRow as bad:
            dataset.count_bad(bad)
            continue
        positions.append(position)
        texts.append(estimation_text(_plain(prompt), _plain(chosen), _plain(rejected)))
    longest = getattr(model.config, "max_position_embeddings", None)  # the start is kept, as the authors' reader
    batches = [tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=longest is not None,
                         max_length=longest) for i in range(0, len(texts), batch_size)]
    with torch.random.fork_rng(devices=[]):  # the dropout masks from the run's seed: every process, every resume
        torch.manual_seed(seed)
        probs = mc_dropout_probs(model, batches, passes)
    kept, noise = reliable_pairs(probs, keep, torch.Generator().manual_seed(seed))
    if not kept:
        raise UserError(f"data.estimator kept none of {len(texts)} pairs ({noise} judged noisy): check the estimator, "
                        "or raise data.estimator_keep")
    dataset.narrow([positions[i] for i in kept])
    print(f"data.estimator: kept {len(kept)} of {len(texts)} pairs ({noise} dropped as noise, the rest sampled by "
          f"certainty at data.estimator_keep={keep})", file=sys.stderr, flush=True)
