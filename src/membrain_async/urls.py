"""Endpoint URLs: which are well formed, and how they may be shown.

A password in the userinfo (redis://user:secret@host), and every value of a query string
(redis://host/0?password=secret), is replaced: every log line, error message and
start-up line that names an endpoint goes through `redact_url`, so a credential given in the URL is never
printed. (The settings' own secrets, tokens and passwords, are shown as *** by `ConnectorConfig.shown`.)
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MEMBRAIN_SCHEMES = ("http", "https")
REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
MOONCAKE_SCHEMES = ("mooncake",)
SCHEMES = MEMBRAIN_SCHEMES + REDIS_SCHEMES + MOONCAKE_SCHEMES


def _redacted_query(query: str) -> str:
    """Every value hidden: no client reads a query string, and `?password=...` is how other Redis clients take
    a password, so one that is there may well be a secret."""
    return "&".join(f"{name}=***" if sep else "***" for name, sep, _ in (part.partition("=") for part in query.split("&")))


def redact_url(url: str) -> str:
    try:
        p = urlsplit(url)
    except ValueError:
        return url if "@" not in url and "?" not in url else "<unparseable endpoint>"
    if p.password is None and "@" not in p.netloc and not p.query:
        return url
    netloc = p.netloc
    if "@" in netloc:
        user = p.username or ""
        userinfo = f"{user}:***" if p.password is not None else (user or "***")
        netloc = f"{userinfo}@{netloc.rpartition('@')[2]}"
    query = _redacted_query(p.query) if p.query else ""
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def redact_all(urls) -> str:
    return ",".join(redact_url(u) for u in urls)


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def check_endpoint(url: str) -> None:
    """Raise ValueError naming what is wrong with one endpoint URL as written.

    A typo must read as a typo, not as a store that is "unreachable now": a port out of range, a missing
    host or a Redis path that is not a database number is found here, before anything connects.
    """
    shown = redact_url(url)
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        raise ValueError(f"{shown!r} must start with http(s)://, redis://, rediss://, redis+cluster:// or mooncake://")
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535": no secret in these
        raise ValueError(f"{shown!r} is not a valid URL: {exc}") from None
    if not p.hostname:
        raise ValueError(f"{shown!r} names no host (expected {scheme}://host:port)")
    if port == 0:
        raise ValueError(f"{shown!r}: port 0 cannot be connected to")
    if scheme in REDIS_SCHEMES and p.path.strip("/"):
        db = p.path.strip("/")
        if not db.isdigit():
            raise ValueError(f"{shown!r}: the path must be a database number, got {db!r}")
        if scheme.endswith("+cluster") and int(db) != 0:
            raise ValueError(f"{shown!r}: Redis Cluster has only database 0")
