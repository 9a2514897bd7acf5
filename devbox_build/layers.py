"""Which locked pip packages share an image layer, decided from the lock alone.

A Dockerfile's layers form a chain: a change in one layer rebuilds it and every layer above it.
So the cheapest order puts big packages low and small ones high (an exchange argument: a group
belongs below another when it holds more bytes per package), and the groups grow geometrically
from the top down: each holds at least as many bytes as everything above it together. A change
to any package then rebuilds at most about twice the bytes of the group that holds it, and a
small leaf (a pin that moves often) rebuilds a layer of a few megabytes, not the whole stack.

The sizes are those of the wheels the lock's platform installs, recorded in the lock (see
locking.py), so the grouping is deterministic: the same lock gives the same layers on any
machine. The spec can give a package a layer of its own (``[layers] own = ["torch"]``) and cap
the layers per lock (``max_per_lock``); overlay2 stacks at most 127 layers, and each group costs
two (its requirements file and its install).

Nothing here depends on install order: every pip layer installs with ``--no-deps`` from a lock
that already holds the whole closure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .locking import Pin

# Below this a layer's fixed cost (a container, a pip start, a commit: about a second here) is
# more than its install; the top group is at least this big.
MIN_LAYER_BYTES = 2_000_000
DEFAULT_MAX_PER_LOCK = 10


@dataclass(frozen=True)
class Group:
    """Packages installed by one layer, biggest first."""

    packages: tuple[Pin, ...]
    own: bool = False  # the spec gave this package a layer of its own

    @property
    def size(self) -> int:
        return sum(pin.size or 0 for pin in self.packages)

    def reason(self) -> str:
        if self.own:
            return "its own layer (key 'layers.own')"
        if len(self.packages) == 1:
            return "one package, big enough for a layer of its own"
        return (f"{len(self.packages)} packages of {megabytes(self.packages[-1].size)}–"
                f"{megabytes(self.packages[0].size)}")


def megabytes(size: int | None) -> str:
    if size is None:
        return "? MB"
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def why(pin: Pin) -> str:
    """One package's line in the rendered Dockerfile: its size and what stands on it."""
    needed = (f"needed by {len(pin.via)}: {', '.join(pin.via[:4])}{', …' if len(pin.via) > 4 else ''}"
              if pin.via else "a leaf: nothing in the lock needs it")
    return f"{pin.name}=={pin.version}  {megabytes(pin.size)}  {needed}"


def group(pins: Iterable[Pin], *, own: Iterable[str] = (),
          max_per_lock: int = DEFAULT_MAX_PER_LOCK) -> list[Group]:
    """The layers for one lock's packages, bottom to top."""
    own = set(own)
    # Biggest first, so bottom first; a package without a recorded size counts as small.
    ordered = sorted(pins, key=lambda pin: (-(pin.size or 0), pin.name))
    top_down: list[Group] = []
    current: list[Pin] = []
    above = 0

    def close() -> None:
        nonlocal above
        if current:
            top_down.append(Group(tuple(reversed(current))))
            above += top_down[-1].size
            current.clear()

    for pin in reversed(ordered):
        if pin.name in own:
            close()
            top_down.append(Group((pin,), own=True))
            above += pin.size or 0
            continue
        if current and (pin.size or 0) >= max(MIN_LAYER_BYTES, above + _size(current)):
            close()  # a package worth a layer alone does not weigh down the small ones above it
        current.append(pin)
        if _size(current) >= max(MIN_LAYER_BYTES, above):
            close()
    close()
    groups = list(reversed(top_down))
    while len(groups) > max_per_lock:
        groups = _merge_smallest_pair(groups)
    return groups


def _size(pins: list[Pin]) -> int:
    return sum(pin.size or 0 for pin in pins)


def _merge_smallest_pair(groups: list[Group]) -> list[Group]:
    """Merge the two neighbours (neither a package's own layer) with the fewest bytes together."""
    pairs = [(groups[i].size + groups[i + 1].size, -i) for i in range(len(groups) - 1)
             if not groups[i].own and not groups[i + 1].own]
    if not pairs:
        raise ValueError("more packages with a layer of their own than layers allowed")
    _, negative = min(pairs)
    i = -negative
    merged = Group(tuple(sorted(groups[i].packages + groups[i + 1].packages,
                                key=lambda pin: (-(pin.size or 0), pin.name))))
    return groups[:i] + [merged] + groups[i + 2:]
