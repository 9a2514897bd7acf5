"""The host's cache: ``$XDG_CACHE_HOME/devbox-build`` (else ``~/.cache/devbox-build``)."""

from __future__ import annotations

import os
from pathlib import Path


def folder(name: str) -> Path:
    """The cache folder for one kind of thing (conda-packages, layers); not created here."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "devbox-build" / name
