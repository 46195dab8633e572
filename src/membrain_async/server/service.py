"""Operations shared by the HTTP and bulk front ends: validation, auth, store calls, counters.

Every check happens here once, so both protocols refuse the same bad input with the same message.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from .. import __version__
from ..config import ServerConfig
from ..protocol import bulk
from ..protocol.names import validate_key, validate_namespace
from .auth import AuthError, Authorizer
from .buffers import BufferPool
from .store import Store


class RequestError(Exception):
    """Bad input from a client: answered with `status` and `message`, connection kept where framing allows."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerCounters:
    started_at: float = field(default_factory=time.time)
    connections_total: int = 0
    connections_open: int = 0
    connections_refused: int = 0
    tls_handshake_failures: int = 0
    http_requests: int = 0
    bulk_frames: int = 0
    errors: Counter = field(default_factory=Counter)  # by status code


class Service:
    def __init__(self, config: ServerConfig, authorizer: Authorizer | None = None):
        self.config = config
        self.buffers = BufferPool(min(64 << 20, config.capacity // 8))
        self.store = Store(config.capacity, recycle=self.buffers.release)
        self.auth = authorizer or Authorizer.from_file(config.auth_file)
        self.counters = ServerCounters()
        self.bound_port: int | None = None

    # --- validation -------------------------------------------------------------------------------

    def _ns(self, ns: str | None) -> str:
        try:
            return validate_namespace(ns)  # type: ignore[arg-type]
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    def _keys(self, keys: list[str]) -> list[str]:
        if len(keys) > self.config.max_batch_keys:
            raise RequestError(413, f"{len(keys)} keys in one request; the limit is {self.config.max_batch_keys}")
        try:
            for k in keys:
                validate_key(k)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        return keys

    def _authorize(self, token: str | None, ns: str | None, need: str) -> None:
        try:
            self.auth.check(token, ns, need)
        except AuthError as exc:
            raise RequestError(exc.status, str(exc)) from None

    def check_value_size(self, size: int) -> None:
        if size < 0:
            raise RequestError(400, "negative value size")
        if size > self.config.max_value_bytes:
            raise RequestError(413, f"value of {size} bytes exceeds the limit of {self.config.max_value_bytes}")

    # --- operations -------------------------------------------------------------------------------

    def begin_put(self, token: str | None, ns: str, keys: list[str], sizes: list[int]) -> str:
        """Validate a put before its body is read; evicts ahead so memory stays within capacity."""
        ns = self._ns(ns)
        self._keys(keys)
        if len(sizes) != len(keys):
            raise RequestError(400, f"{len(keys)} keys but {len(sizes)} sizes")
        for s in sizes:
            self.check_value_size(s)
        self._authorize(token, ns, "write")
        self.store.reserve(sum(sizes))
        return ns

    def commit_put(self, ns: str, keys: list[str], values: list) -> int:
        stored = 0
        for key, value in zip(keys, values):
            if self.store.put(ns, key, value) is not None:
                stored += 1
        return stored

    def get_many(self, token: str | None, ns: str, keys: list[str]) -> list:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        return [self.store.get(ns, k) for k in keys]

    def lookup(self, token: str | None, ns: str, keys: list[str]) -> int:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        return self.store.prefix_count(ns, keys)

    def exists(self, token: str | None, ns: str, keys: list[str]) -> list[int]:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "read")
        return [1 if self.store.contains(ns, k) else 0 for k in keys]

    def list_keys(self, token: str | None, ns: str, limit: int) -> dict:
        """Keys of one namespace, for operators and tests; needs read access to that namespace only."""
        ns = self._ns(ns)
        self._authorize(token, ns, "read")
        keys, truncated = self.store.keys(ns, limit)
        return {"keys": keys, "truncated": truncated}

    def head(self, token: str | None, ns: str, key: str) -> int | None:
        ns = self._ns(ns)
        self._keys([key])
        self._authorize(token, ns, "read")
        return self.store.peek_size(ns, key)

    def delete(self, token: str | None, ns: str, keys: list[str]) -> int:
        ns = self._ns(ns)
        self._keys(keys)
        self._authorize(token, ns, "write")
        return sum(1 for k in keys if self.store.delete(ns, k))

    def stats(self, token: str | None) -> dict:
        try:
            visible = self.auth.readable_namespaces(token)
        except AuthError as exc:
            raise RequestError(exc.status, str(exc)) from None
        out = self.store.stats(visible)
        if visible is None:
            c = self.counters
            out["server"] = {
                "uptime_s": round(time.time() - c.started_at, 3),
                "connections_open": c.connections_open,
                "connections_total": c.connections_total,
                "connections_refused": c.connections_refused,
                "tls_handshake_failures": c.tls_handshake_failures,
                "http_requests": c.http_requests,
                "bulk_frames": c.bulk_frames,
                "errors": {str(k): v for k, v in c.errors.items()},
            }
        return out

    def require_server_read(self, token: str | None) -> None:
        self._authorize(token, None, "read")

    def info(self) -> dict:
        cfg = self.config
        return {
            "server": "membrain",
            "version": __version__,
            "capabilities": ["memory", "batch", "lookup", "exists", "keys", "bulk", "stats", "metrics"]
            + (["auth"] if self.auth.enabled else []),
            "put_existing": "overwrite",
            "limits": {
                "capacity": cfg.capacity,
                "max_value_bytes": cfg.max_value_bytes,
                "max_batch_keys": cfg.max_batch_keys,
                "max_connections": cfg.max_connections,
                "max_namespace_len": 128,
                "max_key_len": 512,
            },
            "bulk": {"port": self.bound_port, "same_port": True, "magic": bulk.MAGIC.decode(), "version": bulk.VERSION},
            "auth": self.auth.enabled,
        }
