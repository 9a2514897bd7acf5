"""Which locked pip packages share an image layer, decided from the lock alone.

A Dockerfile's layers form a chain: a change in one layer rebuilds it and every layer above it.
Each layer costs a fixed overhead (a container, pip's start, a commit) plus its install, which
grows with its bytes and its package count. The grouping minimises the expected cost of a
one-pin change, every pin equally likely to move:

    sum over layers g of  (LAYER_OVERHEAD_BYTES + PACKAGE_OVERHEAD_BYTES × packages of g
                           + bytes of g) × (packages in g and below it)

Small packages an input file names (the spec's own choices: a leaf, the project's own package)
are the pins a team moves most, so they go on top, in a layer of their own: moving one rebuilds
that layer and nothing of the rest. The others are ordered biggest first, bottom up (an exchange argument: a group belongs below
another when it holds more bytes per package), and a dynamic programme picks the cut points.
Big packages (pyarrow, scipy, numpy, torch and the CUDA wheels) get layers of their own near the
bottom, where few packages sit below them; small packages share a few layers at the top, where
a layer's fixed cost would be paid again by every change below it. A leaf that moves rebuilds a
few megabytes; numpy rebuilds numpy and what is above it, not pyarrow or scipy.

The sizes are those of the wheels the lock's platform installs, recorded in the lock (see
locking.py), so the grouping is deterministic: the same lock gives the same layers on any
machine. The spec can give a package a layer of its own (``[layers] own = ["torch"]``) and cap
the layers per lock (``max_per_lock``: overlay2 stacks at most 127 layers, and each group costs
two, its requirements file and its install); over the cap, the neighbours whose merge costs
least are merged.

Nothing here depends on install order: every pip layer installs with ``--no-deps`` from a lock
that already holds the whole closure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .locking import Pin

# Costs in bytes of wheel installed in the same time, measured on this machine's engine (the
# step times of a cold build of the default image): a layer's fixed cost (a container, pip's
# start, the mtime pass, a commit) is about 1.5 s, what 30 MB of big wheels take; each package
# adds about 80 ms (pip's checks, its RECORD, a dist-info), what 1.6 MB take.
LAYER_OVERHEAD_BYTES = 30_000_000
PACKAGE_OVERHEAD_BYTES = 1_600_000
# Below this an input's own package is "small" and goes to the top layer.
SMALL_DIRECT_BYTES = 2_000_000
DEFAULT_MAX_PER_LOCK = 10


@dataclass(frozen=True)
class Group:
    """Packages installed by one layer, biggest first."""

    packages: tuple[Pin, ...]
    own: bool = False  # the spec gave this package a layer of its own
    top: bool = False  # the small packages the input files name

    @property
    def size(self) -> int:
        return sum(pin.size or 0 for pin in self.packages)

    def reason(self) -> str:
        if self.own:
            return "its own layer (key 'layers.own')"
        if self.top:
            return "small packages the input files name, the pins moved most: on top"
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


def group(pins: Iterable[Pin], *, own: Iterable[str] = (), below: int = 0,
          max_per_lock: int = DEFAULT_MAX_PER_LOCK) -> list[Group]:
    """The layers for one lock's packages, bottom to top. ``below``: how many packages the
    layers under this lock's install (a lower lock's) hold; a change in any of them rebuilds
    all of these layers too, so each layer's overhead counts for them as well."""
    own = set(own)
    pins = list(pins)
    # Above another lock every layer is rebuilt by each change below, so there a layer of its
    # own for the small inputs would cost more than it saves.
    top = sorted((pin for pin in pins if pin.direct and pin.name not in own and not below
                  and (pin.size or 0) < SMALL_DIRECT_BYTES),
                 key=lambda pin: (-(pin.size or 0), pin.name))
    # Biggest first, so bottom first; a package without a recorded size counts as small.
    ordered = sorted((pin for pin in pins if pin not in top),
                     key=lambda pin: (-(pin.size or 0), pin.name))
    count = len(ordered)
    prefix = [0]
    for pin in ordered:
        prefix.append(prefix[-1] + (pin.size or 0))
    # best[j]: the least cost of the bottom j packages in layers; start[j]: where the top one of
    # those layers starts. A change in any of the j packages rebuilds that top layer.
    best, start = [0] * (count + 1), [0] * (count + 1)
    for j in range(1, count + 1):
        best[j] = -1
        for i in range(j - 1, -1, -1):
            if i < j - 1 and (ordered[i].name in own or ordered[j - 1].name in own):
                break  # a package with its own layer shares it with nobody
            cost = best[i] + (LAYER_OVERHEAD_BYTES + PACKAGE_OVERHEAD_BYTES * (j - i)
                              + prefix[j] - prefix[i]) * (below + j)
            if best[j] < 0 or cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], count
    while j > 0:
        span = tuple(ordered[start[j]:j])
        groups.append(Group(span, own=len(span) == 1 and span[0].name in own))
        j = start[j]
    groups.reverse()
    if top:
        groups.append(Group(tuple(top), top=True))
    while len(groups) > max_per_lock:
        groups = _merge_cheapest_pair(groups, below)
    return groups


def _merge_cheapest_pair(groups: list[Group], below: int) -> list[Group]:
    """Merge the two neighbours (neither a package's own layer) whose merge adds least cost."""
    at_or_below = []
    for g in groups:
        at_or_below.append((at_or_below[-1] if at_or_below else below) + len(g.packages))
    candidates = []
    # The top group (the inputs' small packages) is merged last: the cost model cannot see
    # that its pins move more often than the others.
    keep_top = sum(not g.own for g in groups) > 2
    for i in range(len(groups) - 1):
        lower, upper = groups[i], groups[i + 1]
        if lower.own or upper.own or (upper.top and keep_top):
            continue
        # Merged, the lower group's bytes are rebuilt by changes in the upper one too, and the
        # changes at or below the lower one no longer pay a second overhead.
        lower_cost = lower.size + PACKAGE_OVERHEAD_BYTES * len(lower.packages)
        added = lower_cost * len(upper.packages) - LAYER_OVERHEAD_BYTES * at_or_below[i]
        candidates.append((added, -i))
    if not candidates:
        raise ValueError("more packages with a layer of their own than layers allowed")
    i = -min(candidates)[1]
    merged = Group(groups[i].packages + groups[i + 1].packages)
    return groups[:i] + [merged] + groups[i + 2:]
