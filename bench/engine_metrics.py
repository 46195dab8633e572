"""Means of a vLLM engine's histograms, from the text of its /metrics (one fetch per engine, many series)."""

from __future__ import annotations

import re


def total(texts: list[str], name: str) -> float:
    """The sum of every series of `name` in `texts` (0 when absent: nothing counted yet)."""
    pattern = rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$"
    return sum(float(v) for text in texts for v in re.findall(pattern, text, re.M))


def histogram_mean_ms(texts: list[str], name: str) -> float | None:
    """The mean of histogram `name` over every series in `texts`, in ms; None if nothing was observed."""
    count = total(texts, f"{name}_count")
    return round(total(texts, f"{name}_sum") / count * 1000, 1) if count else None
