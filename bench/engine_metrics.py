"""Means of a vLLM engine's histograms, from the text of its /metrics (one fetch per engine, many series)."""

from __future__ import annotations

import re


def histogram_mean_ms(texts: list[str], name: str) -> float | None:
    """The mean of histogram `name` over every series in `texts`, in ms; None if nothing was observed."""
    def total(suffix: str) -> float:
        pattern = rf"^{re.escape(name)}_{suffix}(?:{{[^}}]*}})? (\S+)$"
        return sum(float(v) for text in texts for v in re.findall(pattern, text, re.M))

    count = total("count")
    return round(total("sum") / count * 1000, 1) if count else None
