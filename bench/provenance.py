"""Which code a benchmark ran and when: every result JSON records both, and docs/benchmarks.md shows them."""

from __future__ import annotations

import datetime
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))


def commit() -> str:
    """The checkout's short commit ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
