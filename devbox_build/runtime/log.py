"""The runtime's one way to tell the user something, and its one way to write a file."""

from __future__ import annotations

import fcntl
import os
import re
import resource
import sys

# user:password@ or token@ in a URL: never printed.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def mask(text: str) -> str:
    """``text`` with any credentials in URLs replaced by ``***``."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


class Messages:
    """Lines on standard error, each starting with the program's name."""

    def __init__(self, program: str):
        self.program = program

    def __call__(self, message: str) -> None:
        print(f"{self.program}: {mask(message)}", file=sys.stderr, flush=True)


def account_housekeeping(path: str) -> None:
    """Add this process's CPU seconds to the housekeeping total at ``path`` (best effort: a
    container whose /tmp is read-only only loses the correction)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        os.makedirs(os.path.dirname(path), mode=0o1777, exist_ok=True)
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            try:
                total = float(handle.read().strip() or 0)
            except ValueError:
                total = 0.0
            handle.seek(0)
            handle.truncate()
            handle.write(f"{total + usage.ru_utime + usage.ru_stime:.6f}\n")
    except OSError:
        pass


def housekeeping_seconds(path: str) -> float:
    try:
        with open(path) as handle:
            return float(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


def write_atomic(path: str, text: str, mode: int | None = None) -> None:
    """Write a file so a reader sees the old content or the new, never a part."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
