"""The HTTP API: routes and batch bodies, sans-IO. The server routes with it, the client builds paths with it.

Routes
    GET    /healthz                      liveness: 200 while the process serves
    GET    /readyz                       readiness: 200 {"status": "ok"}, 503 {"status": "degraded", "reason": ...}
    GET    /v1/info                      version, capabilities, limits, bulk endpoint
    GET    /v1/stats                     per-namespace counters (JSON)
    GET    /metrics                      Prometheus text format
    PUT    /memory/{ns}/{key}            raw bytes body; 201 created, 200 overwritten, 202 not stored (--eviction)
    GET    /memory/{ns}/{key}            raw bytes, 404 on a miss
    HEAD   /memory/{ns}/{key}            200 with Content-Length, 404 on a miss
    DELETE /memory/{ns}/{key}            204, 404 on a miss
    POST   /v1/batch/put/{ns}            batch body (below) -> {"stored": n}
    POST   /v1/batch/get/{ns}            {"keys": [...]} -> batch body, size -1 for a miss
    POST   /v1/lookup/{ns}               {"keys": [...]} -> {"count": leading keys present}
    POST   /v1/exists/{ns}               {"keys": [...]} -> {"present": [0|1, ...]}
    GET    /v1/keys/{ns}?limit=N         {"keys": [...], "truncated": bool}: most recently used first

Batch body: u32 little-endian head length | orjson {"keys": [...], "sizes": [...]} | values concatenated.
The JSON bodies are classes in bodies.py and heads.py; the paths are built here (below), never spelled by callers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from urllib.parse import quote, unquote

import orjson

BATCH_CONTENT_TYPE = "application/x-membrain-batch"
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    namespace: str | None = None
    key: str | None = None


class RouteError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
INFO_PATH = "/v1/info"
STATS_PATH = "/v1/stats"
METRICS_PATH = "/metrics"

_STATIC = {
    ("GET", HEALTHZ_PATH): "healthz",
    ("GET", READYZ_PATH): "readyz",
    ("GET", INFO_PATH): "info",
    ("GET", STATS_PATH): "stats",
    ("GET", METRICS_PATH): "metrics",
}
_BATCH = {"put": "batch_put", "get": "batch_get"}
_MEMORY_METHODS = {"PUT": "put", "GET": "get", "HEAD": "head", "DELETE": "delete"}


def match_route(method: str, target: str) -> Route:
    """Map (method, request target) to a Route, or raise RouteError(404/405)."""
    path = target.split("?", 1)[0]
    static = _STATIC.get((method, path))
    if static:
        return Route(static)
    if any(p == path for (_, p) in _STATIC):
        raise RouteError(405, f"{method} not allowed on {path}")
    parts = [unquote(p) for p in path.split("/")[1:]]
    if len(parts) == 3 and parts[0] == "memory":
        if method not in _MEMORY_METHODS:
            raise RouteError(405, f"{method} not allowed on /memory/...; use PUT, GET, HEAD or DELETE")
        return Route(_MEMORY_METHODS[method], parts[1], parts[2])
    if len(parts) == 4 and parts[:2] == ["v1", "batch"] and parts[2] in _BATCH:
        if method != "POST":
            raise RouteError(405, "batch endpoints take POST")
        return Route(_BATCH[parts[2]], parts[3])
    if len(parts) == 3 and parts[:2] == ["v1", "keys"]:
        if method != "GET":
            raise RouteError(405, "/v1/keys takes GET")
        return Route("keys", parts[2])
    if len(parts) == 3 and parts[0] == "v1" and parts[1] in ("lookup", "exists"):
        if method != "POST":
            raise RouteError(405, f"/v1/{parts[1]} takes POST")
        return Route(parts[1], parts[2])
    raise RouteError(404, f"no such route: {method} {path}")


MAX_KEYS_LISTED = 10_000


def keys_limit(target: str) -> int:
    """The `limit` query parameter of /v1/keys (default 1000, at most MAX_KEYS_LISTED)."""
    from urllib.parse import parse_qs

    query = target.split("?", 1)[1] if "?" in target else ""
    raw = parse_qs(query).get("limit", ["1000"])[-1]
    try:
        limit = int(raw)
    except ValueError:
        raise RouteError(400, f"limit must be an integer, got {raw!r}") from None
    if not 1 <= limit <= MAX_KEYS_LISTED:
        raise RouteError(400, f"limit must be 1..{MAX_KEYS_LISTED}, got {limit}")
    return limit


# --- paths, one builder per route: what match_route reads back to the same Route -----------------------------


def _segment(name: str) -> str:
    # The characters valid names may hold stay as they are, so a path's bytes are the ones always sent;
    # anything else (a '/', '?', '%', a space, non-ASCII) is percent-encoded, which match_route undoes.
    if name in (".", ".."):  # a dot segment would be resolved away by an HTTP client before it is sent
        return name.replace(".", "%2E")
    return quote(name, safe=":@+=")


def memory_path(ns: str, key: str) -> str:
    return f"/memory/{_segment(ns)}/{_segment(key)}"


def batch_put_path(ns: str) -> str:
    return f"/v1/batch/put/{_segment(ns)}"


def batch_get_path(ns: str) -> str:
    return f"/v1/batch/get/{_segment(ns)}"


def lookup_path(ns: str) -> str:
    return f"/v1/lookup/{_segment(ns)}"


def exists_path(ns: str) -> str:
    return f"/v1/exists/{_segment(ns)}"


def keys_path(ns: str, limit: int | None = None) -> str:
    path = f"/v1/keys/{_segment(ns)}"
    return path if limit is None else f"{path}?limit={int(limit)}"


def encode_batch(keys: list[str], values: list[bytes | memoryview | None]) -> list[bytes | memoryview]:
    """Batch body as a list of buffers (send them in order; no concatenation of values)."""
    sizes = [-1 if v is None else len(v) for v in values]
    head = orjson.dumps({"keys": keys, "sizes": sizes})
    return [_U32.pack(len(head)), head, *(v for v in values if v)]


def decode_batch(body: bytes | bytearray | memoryview) -> tuple[list[str], list[memoryview | None]]:
    """Inverse of encode_batch; values are views into `body` (no copies). Raises ValueError on bad input."""
    view = memoryview(body)
    if len(view) < 4:
        raise ValueError("batch body shorter than its 4-byte head length")
    (head_len,) = _U32.unpack_from(view)
    if 4 + head_len > len(view):
        raise ValueError("batch head length runs past the end of the body")
    try:
        head = orjson.loads(view[4 : 4 + head_len])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"batch head is not JSON: {exc}") from None
    if not isinstance(head, dict):
        raise ValueError("batch head must be a JSON object")
    keys, sizes = head.get("keys"), head.get("sizes")
    if not isinstance(keys, list) or not isinstance(sizes, list) or len(keys) != len(sizes):
        raise ValueError("batch head needs 'keys' and 'sizes' lists of equal length")
    if not all(isinstance(k, str) for k in keys) or not all(isinstance(s, int) and s >= -1 for s in sizes):
        raise ValueError("batch keys must be strings and sizes integers >= -1")
    offset = 4 + head_len
    values: list[memoryview | None] = []
    for size in sizes:
        if size < 0:
            values.append(None)
            continue
        if offset + size > len(view):
            raise ValueError("batch values run past the end of the body")
        values.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise ValueError(f"batch body has {len(view) - offset} trailing bytes")
    return keys, values
