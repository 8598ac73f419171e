"""The protocol both round drivers share (images: :mod:`diffalign.train.online`; text: :mod:`diffalign.train.lm_online`).

Round r covers optimiser steps [r S, (r + 1) S), S = ``online.steps_per_round``. Its folder
``run/rounds/round-NNNNN/`` is written whole or not at all: into ``round-NNNNN.tmp`` (by every process's share,
then the main process's join), renamed into place, and every process waits for it. Once on disk a round is
read back, never sampled again, so a resumed run trains on exactly the rounds the first one sampled; the round
being trained is loaded once and kept. A driver says only how it samples a round into a folder
(:meth:`RoundDriver.sample_part` on every process, :meth:`RoundDriver.join` on the main one) and how it turns a
round's folder into what its steps train on (:meth:`RoundDriver.load`), and answers :meth:`micro_batch`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from diffalign.paths import with_usual_permissions


class RoundDriver:
    """A batch source of rounds; see the module docstring. ``config`` is the run's, ``accelerator`` accelerate's."""

    def __init__(self, config, output_dir: Path, accelerator) -> None:
        self.config, self.accelerator = config, accelerator
        self.root = Path(output_dir) / "rounds"
        self.steps_per_round = config.online.steps_per_round
        self._loaded: tuple[int, dict[str, Any]] | None = None

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r:05d}"

    def round_of(self, step: int) -> int:
        return step // self.steps_per_round

    def is_written(self, r: int) -> bool:
        return self.round_dir(r).is_dir()

    # --- what a driver says ----------------------------------------------------------------
    def sample_part(self, r: int, folder: Path) -> None:
        """This process's share of round r, written into ``folder`` (default: none; the main process's join does
        it all)."""

    def join(self, r: int, folder: Path) -> None:
        """On the main process, after every process's share is in ``folder``: make round r's files whole."""
        raise NotImplementedError

    def load(self, r: int, folder: Path) -> dict[str, Any]:
        """What the steps of round r train on, from its folder."""
        raise NotImplementedError

    def micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        """This process's share of micro-batch (step, micro): a pure function of (seed, step, micro) and the round."""
        raise NotImplementedError

    # --- the protocol --------------------------------------------------------------------------
    def write(self, r: int) -> None:
        """Sample round r into its folder, atomically: every process its share, then the main process's join."""
        acc = self.accelerator
        final = self.round_dir(r)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self.sample_part(r, tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.join(r, tmp)
            os.replace(with_usual_permissions(tmp), final)
        acc.wait_for_everyone()

    def round(self, r: int) -> dict[str, Any]:
        """Round r's training data: sampled first if it is not on disk, loaded once."""
        if self._loaded is not None and self._loaded[0] == r:
            return self._loaded[1]
        if not self.is_written(r):
            self.write(r)
        data = self.load(r, self.round_dir(r))
        self._loaded = (r, data)
        return data
