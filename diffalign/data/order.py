"""Deterministic data order: a fresh permutation per epoch from (seed, epoch).

The k-th example of the whole run is a pure function of (seed, k), so resuming at step s
reads exactly what an uninterrupted run reads at step s, and N processes with batch B read
the same examples as one process with batch N*B.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class RunOrder(Protocol):
    """What the reader asks of an order: the dataset index read at each position of the run."""

    def __getitem__(self, position: int) -> int: ...


class _EpochOrder:
    """An order made one epoch at a time: ``order[k]`` is entry k mod size of epoch k // size's order.

    Safe to call from the reader's threads: reads near an epoch's end mix two epochs, so the
    orders of neighbouring epochs are kept, and each call works on its own reference.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset indices of one epoch, in the order they are read."""
        raise NotImplementedError

    def _permutation(self, epoch: int) -> torch.Tensor:
        """A fresh permutation of the dataset from (seed, epoch)."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        order = self._epochs.get(epoch)
        if order is None:
            order = self._epoch_order(epoch)
            kept = {e: o for e, o in self._epochs.items() if abs(e - epoch) <= 1}
            self._epochs = {**kept, epoch: order}  # one atomic swap: another thread's lookup never fails
        return int(order[offset])


class DeterministicOrder(_EpochOrder):
    """``order[k]``: the dataset index read at position k of the run, a fresh permutation per epoch."""

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return self._permutation(epoch)


class CurriculumOrder(_EpochOrder):
    """``order[k]``: each epoch reads the examples from the easiest to the hardest, as Curry-DPO orders its
    pairs (Pattnaik et al. 2024, EMNLP, arXiv 2403.07230, Fig. 1: the larger the rating gap between chosen and
    rejected, the easier, and the earlier); ``ease[i]`` is example i's, higher is easier. Examples of equal ease
    come in the order of a fresh permutation per epoch from (seed, epoch), so like :class:`DeterministicOrder`
    the k-th example is a pure function of (seed, k): resumes and several processes read what one
    uninterrupted process reads. (The paper's iterations, which make each stage's policy the next stage's
    reference, are not this order's business.)
    """

    def __init__(self, ease: Sequence[float], seed: int) -> None:
        self.ease = torch.as_tensor(list(ease), dtype=torch.float64)
        super().__init__(len(self.ease), seed)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        shuffled = self._permutation(epoch)  # equal ease keeps this order: a stable sort
        return shuffled[torch.sort(self.ease[shuffled], descending=True, stable=True).indices]


class ClassRatioOrder:
    """``order[k]``: a member of class c with probability ``ratios[c]``, uniform within the class.

    Each position draws its class, then its member, with replacement, from its own generator
    (seed, position), so like :class:`DeterministicOrder` the k-th example is a pure function
    of (seed, k). This is what torch's ``WeightedRandomSampler`` does with class-balanced weights,
    as Diffusion-KTO's training script samples liked images with ``--positive_ratio``.
    """

    _TAG = 7919  # keeps these draws apart from the examples' timestep and noise generators

    def __init__(self, members: Sequence[Sequence[int]], ratios: Sequence[float], seed: int) -> None:
        if len(members) != len(ratios) or any(not m for m in members):
            raise ValueError("ClassRatioOrder needs one non-empty member list per ratio")
        self.members = [torch.as_tensor(list(m)) for m in members]
        self.ratios = torch.tensor(ratios, dtype=torch.float64)
        self.seed = seed

    def __getitem__(self, position: int) -> int:
        generator = example_generator(self.seed, self._TAG, position)
        members = self.members[int(torch.multinomial(self.ratios, 1, generator=generator))]
        return int(members[torch.randint(len(members), (), generator=generator)])


def example_generator(seed: int, *position: int) -> torch.Generator:
    """The RNG of one example of the run (its timestep and noise), independent of batching.

    ``position`` may have several parts (an online round and a tag, say); for one part the
    seed is ``seed * 1_000_003 + position``.
    """
    mixed = seed
    for part in position:
        mixed = (mixed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
