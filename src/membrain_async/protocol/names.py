"""Namespace and key names: what the server accepts in URLs, bulk frames and auth files."""

from __future__ import annotations

import re

MAX_NAMESPACE_LEN = 128
MAX_KEY_LEN = 512

# URL-safe without escaping, so the same name reads the same in a path segment, a log line and a bulk frame.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_KEY_RE = re.compile(r"[A-Za-z0-9._:~@+=-]+")


def validate_namespace(ns: str) -> str:
    if not isinstance(ns, str) or not ns:
        raise ValueError("namespace must be a non-empty string")
    if len(ns) > MAX_NAMESPACE_LEN:
        raise ValueError(f"namespace longer than {MAX_NAMESPACE_LEN} characters")
    if not _NAMESPACE_RE.fullmatch(ns):
        raise ValueError(f"namespace {ns[:40]!r} may only hold letters, digits, '.', '_', '-' and must start alphanumeric")
    return ns


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"key longer than {MAX_KEY_LEN} characters")
    if not _KEY_RE.fullmatch(key) or key in (".", ".."):
        raise ValueError(f"key {key[:40]!r} may only hold letters, digits and . _ : ~ @ + = -")
    return key
