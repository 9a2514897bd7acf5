"""One lock file and the image layer it feeds: what every package kind (pip, conda) implements.

locking.py runs one loop over a spec's units, in an order where a unit follows the one it stands
on: ``check`` asks each for its verdict, ``lock`` writes the ones that are missing or stale. A new
package kind (npm, apt from a lock) is a subclass here, a template step and a spec section.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from .spec import ImageSpec

# A unit's verdicts. An edited lock is refused even by build --allow-stale.
MISSING, EDITED, STALE = "missing", "edited", "stale"
DIVERGED = "differs between platforms"


@dataclass(frozen=True)
class Input:
    """An input file of a lock, relative to the spec's folder; ``section`` names a part of it
    that belongs to another package kind (an environment.yml's ``pip:`` list)."""

    path: str
    section: str | None = None

    def __str__(self) -> str:
        # Also the text the inputs digest records, so locks stay fresh across this type's life.
        return f"{self.path}#{self.section}" if self.section else self.path


@dataclass(frozen=True)
class LockUnit(ABC):
    """One lock file of a spec: its name, the image layer that installs it, its inputs
    (cumulative) and the unit it stands on (its pins constrain this one's)."""

    name: str
    layer: str  # "conda", "pip", "variant" or "dev"
    inputs: tuple[Input, ...]
    below: LockUnit | None = field(default=None, compare=False)

    @abstractmethod
    def path(self, spec: ImageSpec) -> Path:
        """Where the lock lives."""

    @abstractmethod
    def verdict(self, spec: ImageSpec) -> str | None:
        """MISSING, EDITED or STALE, with the reason after a colon; None when the lock holds."""

    @abstractmethod
    def write(self, spec: ImageSpec, *, resolver: str, upgrade: bool) -> int:
        """Resolve and write the lock atomically; how many packages it holds."""

    @abstractmethod
    def count(self, spec: ImageSpec) -> int:
        """How many packages the written lock holds."""


@dataclass
class LockResult:
    path: Path
    status: str  # "written" or "up to date"
    packages: int
    seconds: float
