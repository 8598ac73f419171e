"""The run's examples by position, read and decoded ahead of the step that needs them.

Reading an example is the CPU's share of a step: fetch the row, decode the images (JPEG/PNG),
resize and crop. Done in the training loop it leaves the GPU idle for that long every step
(about 0.1 s for a pair of 1024 px images on one core, a large part of an SDXL LoRA step on
an H100). The run's order is known in advance, so a thread pool reads the next examples while
the GPU works: PIL's decode and resize release the GIL, so threads overlap for real.

What a position gives is a pure function of the data and the position: a bad row is replaced
by the next usable one in the run's order, so batches keep their size and every process stays
in step (no rank without a backward pass). The threads only read; the bad rows met on the way
are counted (or raised, with ``on_error=raise``) when the training loop takes the example, in
position order. So the counts, the errors and the examples are the same with any number of
threads, and resume and multi-process runs stay exact.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

from diffalign.data.order import RunOrder
from diffalign.data.pairs import BadRow, GroupExample, ImageRows
from diffalign.errors import UserError


class ExampleReader:
    """The usable example at each position of the run, optionally read ahead by ``workers`` threads.

    ``is_cached(example)`` says whether what the run encodes of an example (read undecoded: its image ids and
    caption) is cached already; those examples are only hashed, not decoded (their pixels are never needed). ``augment(position,
    example)`` changes the example read for a position (:class:`~diffalign.data.augment.RandomFlip`),
    its image ids included, before the cache is asked.
    """

    def __init__(self, dataset: ImageRows, order: RunOrder, workers: int,
                 is_cached: Callable[[GroupExample], bool] | None = None,
                 augment: Callable[[int, GroupExample], GroupExample] | None = None) -> None:
        self.dataset = dataset
        self.order = order
        self.is_cached = is_cached
        self.augment = augment or (lambda position, example: example)
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="diffalign-read") if workers > 0 else None
        self._ahead: dict[int, Future] = {}

    def _find(self, position: int) -> tuple[GroupExample, list[BadRow]]:
        """The example for ``position`` and the bad rows skipped to reach it; counts nothing."""
        bad: list[BadRow] = []
        size = len(self.dataset)
        epoch_start = position - position % size
        # the following positions of the same epoch, then its first ones: every row of the epoch once, never a
        # row of the next epoch's order (which would skip past the epoch's own good rows)
        for offset in range(size):
            item = self.order[epoch_start + (position - epoch_start + offset) % size]
            try:
                if self.is_cached is not None:
                    hashed = self.augment(position, self.dataset.read(item, decode=False))
                    if self.is_cached(hashed):
                        return hashed, bad
                # decodes, which also checks the images
                return self.augment(position, self.dataset.read(item)), bad
            except BadRow as err:
                bad.append(err)
        raise UserError(f"no example of {self.dataset.source.path} can be decoded; check the data "
                        f"(first problem: {bad[0] if bad else 'none'})")

    def prefetch(self, positions: Iterable[int]) -> None:
        """Start reading these positions in the background (no-op without workers)."""
        if self._pool is None:
            return
        for position in positions:
            if position not in self._ahead:
                self._ahead[position] = self._pool.submit(self._find, position)

    def take(self, position: int) -> GroupExample:
        """The example at ``position`` (read now unless prefetched), its skipped rows counted."""
        ahead = self._ahead.pop(position, None)
        example, bad = ahead.result() if ahead is not None else self._find(position)
        for err in bad:
            self.dataset.count_bad(err)
        return example

    def close(self) -> None:
        """Stop the threads; reads not started are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
