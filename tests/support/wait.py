"""Waiting for a state, never for a time: poll a condition until it holds, bounded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(condition: Callable[[], T], *, timeout: float, what: str | Callable[[], str],
          every: float = 0.2, alive: Callable[[], bool] | None = None) -> T:
    """``condition()``'s first truthy value; an AssertionError naming ``what`` (a text, or a
    function making one, e.g. with logs) after ``timeout`` s or as soon as ``alive()`` fails.
    A condition that raises OSError counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if alive is not None and not alive() or time.monotonic() > deadline:
            raise AssertionError(what() if callable(what) else what)
        time.sleep(every)
