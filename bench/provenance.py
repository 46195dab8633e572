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


def cpu_model() -> str:
    """The CPU's model name and whether it has bf16 matrix instructions: figures from different hosts differ
    by more than any change measured here (an AVX2-only host computes bf16 about 9x slower)."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "no bf16"
    return f"{name} ({os.cpu_count()} cores, {bf16})"


def emit(out: dict, path: str | None) -> None:
    """Print a run's results, and write them to `path` where one is given."""
    import json

    text = json.dumps(out, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
