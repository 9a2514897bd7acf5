"""Errors that reach the user, each kind with its own exit code.

Every failure a user can cause or fix (bad spec, stale lock, missing engine, failing build step)
is raised as a :class:`DevboxError` subclass. The CLI prints its message and exits with the
class's code, without a traceback; anything else is a bug and keeps its traceback. The codes let
CI tell a stale lock from a failed build:

    0  success
    1  checks ran and at least one failed (ChecksFailed)
    2  bad input: spec, flag, image reference, CA file (InputError, SpecError; click's usage errors)
    3  a lock is missing, stale, edited by hand, or could not be resolved or written (LockError)
    4  the engine is unreachable or refused an operation (EngineError)
    5  a build step failed (BuildFailed)
    130 / 143  interrupted by Ctrl-C / SIGTERM (Interrupted); nothing was tagged
"""

from __future__ import annotations

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 checks failed, 2 bad input (spec, flag, reference), 3 lock missing, "
    "stale or unwritable, 4 engine unreachable or refused, 5 build step failed, 130/143 "
    "interrupted (Ctrl-C / SIGTERM)."
)


class DevboxError(Exception):
    """A failure with a message written for the user.

    ``hint`` is an optional next step ("run devbox-build lock datascience").
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class InputError(DevboxError):
    """A flag, an image reference, a CA file or another input is not acceptable."""

    exit_code = 2


class SpecError(InputError):
    """The image spec is malformed, has an unknown key, a wrong type or names a missing file."""


class LockError(DevboxError):
    """Locking failed, or a lock is missing, stale, edited by hand or cannot be written."""

    exit_code = 3


class EngineError(DevboxError):
    """The engine refused an operation (pull, push, start, missing image)."""

    exit_code = 4


class EngineUnavailable(EngineError):
    """No container engine answers."""


class BuildFailed(DevboxError):
    """A build step failed; the message carries that step's output."""

    exit_code = 5


class CloudError(DevboxError):
    """AWS refused a request or did not answer (credentials, quota, a missing resource)."""

    exit_code = 6


class ChecksFailed(DevboxError):
    """Checks ran and at least one failed."""

    exit_code = 1


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: a BaseException, like KeyboardInterrupt, so no handler swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
