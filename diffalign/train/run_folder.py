"""A run's output folder: one run writes it at a time, and a write that fails says why in one line.

Two runs started into one ``output_dir`` would each write checkpoints, ``config.yaml`` and metrics over
the other's, and both end "done". :class:`RunLock` takes an exclusive ``flock`` on a file in the folder
for the life of the run: the kernel drops it when the process exits or crashes, so a lock left by a
dead process is no lock, and the second run is refused naming the first's PID. Under torchrun or
accelerate only the global rank 0 takes it (the other ranks write nothing of their own there).

:func:`write_failure` turns what a full disk or a read-only folder raises (``OSError``, or torch's
``PytorchStreamWriter`` RuntimeError, which hides ENOSPC as "unexpected pos 64 vs 0") into a
:class:`~diffalign.errors.UserError` naming the folder and the room needed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from diffalign.errors import UserError

LOCK_FILE = ".diffalign-run.lock"


def is_rank_zero() -> bool:
    """Whether this process is the run's global rank 0 (torchrun and accelerate set RANK; one process has none)."""
    return os.environ.get("RANK", "0") == "0"


class RunLock:
    """An exclusive lock on ``folder`` for one run (a context manager); see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not is_rank_zero():
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_failure(err, self.folder, "the run's folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"another run (PID {holder}) is writing to {self.folder}; two runs in one output_dir "
                            "would overwrite each other's checkpoints and logs. Wait for it, stop it, or choose "
                            "another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a disk or permission failure of a write (not a bug)."""
    if isinstance(err, OSError):
        return err.errno in WRITE_ERRNOS
    # torch.save's zip writer reports a failed write (ENOSPC included) only in these words
    return isinstance(err, RuntimeError) and any(
        words in str(err) for words in ("PytorchStreamWriter failed", "unexpected pos", "file write failed"))


def write_failure(err: BaseException, folder: Path, what: str, needed: int | None = None,
                  last_checkpoint: str | None = None) -> UserError:
    """One line for a failed write of ``what`` into ``folder``: why, the room it needs and has, and where the
    run can continue from."""
    reason = WRITE_ERRNOS.get(getattr(err, "errno", None), f"{type(err).__name__}: {str(err)[:120]}")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    room = f"; it needs about {needed / 2**30:.2f} GiB and the disk has {free / 2**30:.2f} GiB free" \
        if needed is not None else f"; the disk has {free / 2**30:.2f} GiB free"
    resume = (f" The last complete checkpoint is {last_checkpoint}: make room and resume with train.resume=latest."
              if last_checkpoint else "")
    return UserError(f"cannot write {what} into {folder} ({reason}){room}. Nothing half-written was kept.{resume}")
