"""The one error type for bad input. The CLI prints it as one line and exits 2; anything else is a bug and keeps
its traceback (exit 1)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a checkpoint): the message is one line naming the key or
    file and how to fix it. Subclasses ValueError so that library callers catching ValueError keep working."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or parameter (exit code 4); the last good checkpoint is kept."""
