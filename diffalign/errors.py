"""User-facing errors: raised for a mistake the user can fix, printed without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, file, column, ...).

    The message says what went wrong, where, and how to fix it; the CLI prints it as one
    paragraph and exits with status 2.
    """


class Interrupted(Exception):
    """A command stopped by Ctrl-C or SIGTERM after saving what it had: the message says how to continue.

    The CLI prints it and exits with 128 + the signal's number (130 for Ctrl-C), as a shell reports an
    interrupted program, so a script that ran the command sees that it did not finish.
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum


class PausedRound(Exception):
    """An online round that cannot go on now: it waits for human labels, or its reward server does not answer.

    Nothing of the step has run; the trainer checkpoints it and stops with this message, and the run resumed
    later (``train.resume=latest``) samples the same round again, so nothing is lost.
    """


class RewardServerDown(PausedRound, UserError):
    """A reward server that did not answer after its retries: the message names its address and the last error."""
