"""Endpoint URLs as they may be shown: a password in the userinfo (redis://user:secret@host) is replaced.

Every log line, error message and start-up line that names an endpoint goes through `redact_url`, so a
credential given in the URL is never printed. (The settings' own secrets, tokens and passwords, are
never formatted into a message at all.)
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparseable endpoint>"
    if p.password is None and "@" not in p.netloc:
        return url
    host = p.netloc.rpartition("@")[2]
    user = p.username or ""
    userinfo = f"{user}:***" if p.password is not None else (user or "***")
    return urlunsplit((p.scheme, f"{userinfo}@{host}", p.path, p.query, p.fragment))


def redact_all(urls) -> str:
    return ",".join(redact_url(u) for u in urls)


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""
