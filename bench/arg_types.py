"""Argument types for the benchmark scripts: a count or a duration of zero or less is a usage error (argparse
prints one line and exits 2), not a run that divides by zero at the end."""

from __future__ import annotations

import argparse
import os


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:  # nan fails this too; inf passes (a request rate of inf is a burst)
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def seconds_or_zero(text: str) -> float:
    """A finite duration, where 0 means "skip this part"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):  # nan and inf fail too: a loop must end
        raise argparse.ArgumentTypeError(f"must be 0 (skip) or a finite number of seconds above it, got {text}")
    return value


def nice_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -20 <= value <= 19:
        raise argparse.ArgumentTypeError(f"a nice value is -20..19, got {value}")
    return value


def size_text(text: str) -> str:
    """A byte size as Membrain's settings take it ('128MiB', '6GiB'), checked here and passed on as written."""
    from membrain_async.config import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0 bytes, got {text}")
    return text


def json_output(text: str) -> str:
    """A results file to write at the end of a run: its folder must exist and be writable now, not after
    minutes of measuring."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {text} in")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {folder}")
    return text
