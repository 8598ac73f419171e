"""User-facing errors: raised for a mistake the user can fix, printed without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, file, column, ...).

    The message says what went wrong, where, and how to fix it; the CLI prints it as one
    paragraph and exits with status 2.
    """
