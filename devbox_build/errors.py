"""Errors that reach the user.

Every failure a user can cause or fix (bad spec, stale lock, missing engine, failing build step)
is raised as a :class:`DevboxError`. The CLI prints its message and exits non-zero without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DevboxError(Exception):
    """A failure with a message written for the user.

    ``hint`` is an optional next step ("run devbox-build lock datascience").
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class SpecError(DevboxError):
    """The image spec is malformed, has an unknown key, a wrong type or names a missing file."""


class LockError(DevboxError):
    """Locking failed, or a lock is missing or stale."""


class EngineUnavailable(DevboxError):
    """No container engine answers."""


class BuildFailed(DevboxError):
    """A build step failed; the message carries that step's output."""
