"""Per-namespace bearer tokens with read/write scopes.

Auth file (JSON):

    {"tokens": [
        {"token": "tenant-a-secret", "namespaces": ["tenant-a"], "scope": "readwrite", "quota": "25%"},
        {"token": "tenant-b-reader", "namespaces": ["tenant-b"], "scope": "read"},
        {"token": "ops-secret",      "namespaces": ["*"],        "scope": "read"}
    ]}

A token covering "*" may also read server-wide stats and metrics. `quota` (optional: "25%" or 0.25) gives each
namespace of the entry that share of --capacity: a namespace past its share evicts its own values first
(store.py). A namespace named with several quotas gets the smallest. Tokens are compared in constant time
(every token is checked, through fixed-length digests) and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import orjson

_SCOPES = {"read": {"read"}, "write": {"write"}, "readwrite": {"read", "write"}}


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Grant:
    digest: bytes
    namespaces: frozenset[str]
    scopes: frozenset[str]

    def allows(self, ns: str | None, need: str) -> bool:
        if need not in self.scopes:
            return False
        if ns is None:
            return "*" in self.namespaces
        return "*" in self.namespaces or ns in self.namespaces


def _share(value, i: int) -> float:
    """A quota as a share of capacity: 0.25 or "25%"."""
    try:
        share = float(value[:-1]) / 100 if isinstance(value, str) and value.endswith("%") else float(value)
    except (TypeError, ValueError):
        share = -1.0
    if isinstance(value, bool) or not 0 < share <= 1:
        raise ValueError(f"auth file entry {i}: quota must be a share of capacity in (0, 1], like 0.25 or \"25%\"")
    return share


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Authorizer:
    """`None` grants mean auth is off: everything is allowed."""

    def __init__(self, grants: list[Grant] | None, quotas: dict[str, float] | None = None):
        self.grants = grants
        self.quotas = quotas or {}  # namespace -> share of capacity

    @property
    def enabled(self) -> bool:
        return self.grants is not None

    @classmethod
    def from_file(cls, path: str) -> "Authorizer":
        if not path:
            return cls(None)
        try:
            doc = orjson.loads(Path(path).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"cannot read auth file {path}: {exc}") from None
        entries = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f'auth file {path} needs {{"tokens": [{{"token", "namespaces", "scope"}}, ...]}}')
        grants = []
        quotas: dict[str, float] = {}
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("token"), str) or len(e["token"]) < 8:
                raise ValueError(f"auth file entry {i}: 'token' must be a string of at least 8 characters")
            nss = e.get("namespaces")
            if not isinstance(nss, list) or not nss or not all(isinstance(n, str) for n in nss):
                raise ValueError(f"auth file entry {i}: 'namespaces' must be a non-empty list of names or '*'")
            scope = e.get("scope", "readwrite")
            if scope not in _SCOPES:
                raise ValueError(f"auth file entry {i}: scope must be read, write or readwrite")
            grants.append(Grant(_digest(e["token"]), frozenset(nss), frozenset(_SCOPES[scope])))
            if "quota" in e:
                share = _share(e["quota"], i)
                if "*" in nss:
                    raise ValueError(f"auth file entry {i}: a quota needs named namespaces, not '*'")
                for ns in nss:
                    quotas[ns] = min(share, quotas.get(ns, share))
        return cls(grants, quotas)

    def match(self, token: str | None) -> Grant | None:
        if token is None:
            return None
        digest = _digest(token)
        found = None
        for grant in self.grants or ():
            # No early exit: the time taken does not depend on which token matched.
            if hmac.compare_digest(digest, grant.digest):
                found = grant
        return found

    def check(self, token: str | None, ns: str | None, need: str) -> None:
        """Raise AuthError unless `token` may `need` ('read' or 'write') namespace `ns` (None: server-wide)."""
        if self.grants is None:
            return
        if token is None:
            raise AuthError(401, "this server requires a bearer token")
        grant = self.match(token)
        if grant is None:
            raise AuthError(401, "unknown token")
        if not grant.allows(ns, need):
            raise AuthError(403, "token does not grant this access")

    def readable_namespaces(self, token: str | None) -> set[str] | None:
        """Namespaces whose stats the token may see; None means all."""
        if self.grants is None:
            return None
        grant = self.match(token)
        if grant is None:
            raise AuthError(401, "this server requires a bearer token" if token is None else "unknown token")
        if "read" not in grant.scopes:
            raise AuthError(403, "token does not grant read access")
        return None if "*" in grant.namespaces else set(grant.namespaces)


def bearer_token(header_value: bytes | str | None) -> str | None:
    if not header_value:
        return None
    text = header_value.decode("latin-1") if isinstance(header_value, bytes) else header_value
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
