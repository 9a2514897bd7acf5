"""Errors that reach the user, each kind with its own exit code.

Every failure a user can cause or fix (bad spec, stale lock, missing engine, failing build step)
is raised as a :class:`DevboxError` subclass. The CLI prints its message and exits with the
class's code, without a traceback; anything else is a bug and keeps its traceback. The codes let
CI tell a stale lock from a failed build. :data:`EXIT_CODES` is the one table of them: `--help`,
the README's table and each class's ``exit_code`` come from it.
"""

from __future__ import annotations

# code → what it means. The classes below take their code from here.
EXIT_CODES = {
    0: "success",
    1: "checks ran and at least one failed (`check`)",
    2: "bad input: spec, flag, image reference, CA file",
    3: "a lock is missing, stale, edited by hand, unresolvable or could not be written "
       "(`lock --check` included)",
    4: "the engine or a registry is unreachable or refused (missing image, pull, push)",
    5: "a build step failed (its output is shown; nothing is tagged)",
    6: "AWS refused a request or did not answer (`ec2 up`, `down`, `move`, `status`)",
    7: "an image is not signed by the key, or its signature or provenance does not match it "
       "(`verify`, and the targets that verify before they run an image)",
    130: "interrupted by Ctrl-C (nothing new is tagged)",
    143: "interrupted by SIGTERM (nothing new is tagged)",
}


def exit_codes_help() -> str:
    """The table as `--help` prints it."""
    return "Exit codes: " + "; ".join(
        f"{code} {meaning.split(' (')[0]}" for code, meaning in EXIT_CODES.items()) + "."


class DevboxError(Exception):
    """A failure with a message written for the user.

    ``hint`` is an optional next step ("run devbox-build lock datascience").
    """

    exit_code = 2  # see EXIT_CODES

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


class RegistryError(EngineError):
    """A registry refused a request or could not be reached (signatures, provenance)."""


class NotVerified(DevboxError):
    """The image has no signature by the key, or one that does not match it."""

    exit_code = 7


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


def _check_codes() -> None:
    """Every class's code is in the table (import time: a new class without a row fails)."""
    classes = [DevboxError, InputError, LockError, EngineError, BuildFailed, CloudError,
               NotVerified, ChecksFailed]
    missing = [cls.__name__ for cls in classes if cls.exit_code not in EXIT_CODES]
    if missing:
        raise RuntimeError(f"exit codes missing from EXIT_CODES: {missing}")


_check_codes()
