"""The spec's size budget (``[budget]``), held against a built image's manifest.

Sizes are installed bytes as the manifest records them (apt: dpkg's Installed-Size; pip: the
files each package's RECORD lists; conda: the package's files). A layer kind's size is its
packages': ``system`` the apt packages, ``conda`` the conda ones, ``pip``/``variant``/``dev`` the
pip packages of that layer. Every problem names the limit, the figure and the packages that grew
most (against the image the build replaces), or the largest when there is nothing to compare to.
"""

from __future__ import annotations

from .diff import growth, sizes
from .spec import Budget

MB = 1_000_000
SHOWN = 5  # culprits named per problem


def kind_sizes(manifest: dict) -> dict[str, int]:
    """Installed bytes per layer kind."""
    totals = {"system": sum(sizes(manifest, "apt").values()),
              "conda": sum(sizes(manifest, "conda").values())}
    for package in manifest.get("packages", {}).get("pip") or []:
        totals[package["layer"]] = totals.get(package["layer"], 0) + (package.get("size") or 0)
    return totals


def _culprits(manifest: dict, previous: dict | None, kinds: tuple[str, ...] | None = None
              ) -> str:
    if previous is not None:
        grown = [(kind, name, delta) for kind, name, delta in growth(previous, manifest)
                 if delta > 0 and (kinds is None or kind in kinds)]
        return "grew most: " + (", ".join(f"{name} (+{delta / MB:.1f} MB)"
                                          for _, name, delta in grown[:SHOWN]) or "nothing")
    largest = sorted(((size, name) for kind in (kinds or ("apt", "conda", "pip"))
                      for name, size in sizes(manifest, kind).items()), reverse=True)
    return "largest: " + ", ".join(f"{name} ({size / MB:.1f} MB)"
                                   for size, name in largest[:SHOWN])


def problems(budget: Budget, manifest: dict, image_bytes: int,
             previous: tuple[dict, int] | None = None, where: str = "[budget]") -> list[str]:
    """Every limit ``manifest`` (an image of ``image_bytes``) breaks; ``previous``: the manifest
    and size of the image it replaces."""
    found = []
    before = previous[0] if previous else None
    if budget.total_mb is not None and image_bytes > budget.total_mb * MB:
        found.append(f"{where} total_mb: the image is {image_bytes / MB:.0f} MB, over "
                     f"{budget.total_mb} MB; {_culprits(manifest, before)}")
    totals = kind_sizes(manifest)
    for kind, limit in budget.layers.items():
        if totals.get(kind, 0) > limit * MB:
            package_kind = {"system": "apt", "conda": "conda"}.get(kind, "pip")
            found.append(f"{where} layers.{kind}: its packages install "
                         f"{totals[kind] / MB:.0f} MB, over {limit} MB; "
                         f"{_culprits(manifest, before, (package_kind,))}")
    if budget.growth_percent is not None and previous is not None and previous[1]:
        grown = (image_bytes - previous[1]) / previous[1] * 100
        if grown > budget.growth_percent:
            found.append(f"{where} growth_percent: the image grew {grown:.1f}% "
                         f"({previous[1] / MB:.0f} → {image_bytes / MB:.0f} MB), over "
                         f"{budget.growth_percent:g}%; {_culprits(manifest, before)}")
    return found
