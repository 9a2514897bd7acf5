"""The benchmarks' one table format: min / median per figure, over interleaved rounds."""

from __future__ import annotations

import statistics


def min_median(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} s"


def header(rounds: int) -> str:
    return f"| figure (min / median of {rounds}) | measured here |\n|---|---|"
