"""The JSON bodies only the HTTP API has, typed (its lookup, exists, put and error replies are the bulk
replies in heads.py). See wire.py for what they share. /v1/stats stays a free-form document: it is
read by people and dashboards, not by the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .bulk import MAGIC, VERSION
from .names import MAX_KEY_LEN, MAX_NAMESPACE_LEN
from .wire import WireObject, as_object, bool_field, checked, count_field, is_count, str_field, str_list_field


@dataclass(frozen=True, slots=True)
class KeysBody(WireObject):
    """The request body of /v1/lookup, /v1/exists and /v1/batch/get (the namespace is in the path)."""

    what: ClassVar[str] = "keys body"
    keys: list[str]

    @classmethod
    def from_wire(cls, obj: object) -> KeysBody:
        return cls(str_list_field(cls, as_object(cls, obj), "keys"))


@dataclass(frozen=True, slots=True)
class KeysListing(WireObject):
    """GET /v1/keys: keys most recently used first; `truncated` if the limit left some out."""

    what: ClassVar[str] = "keys listing"
    keys: list[str]
    truncated: bool

    @classmethod
    def from_wire(cls, obj: object) -> KeysListing:
        obj = as_object(cls, obj)
        return cls(str_list_field(cls, obj, "keys"), bool_field(cls, obj, "truncated"))


@dataclass(frozen=True, slots=True)
class Health(WireObject):
    """GET /healthz."""

    what: ClassVar[str] = "health reply"
    status: str = "ok"

    @classmethod
    def from_wire(cls, obj: object) -> Health:
        return cls(str_field(cls, as_object(cls, obj), "status"))


@dataclass(frozen=True, slots=True)
class Readiness(WireObject):
    """GET /readyz: "ok", or "degraded" with the reason (the disk tier is off: serving from RAM only)."""

    what: ClassVar[str] = "readiness reply"
    status: str = "ok"
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.status == "ok"

    def to_wire(self) -> dict:
        return {"status": self.status, "reason": self.reason} if self.reason else {"status": self.status}

    @classmethod
    def from_wire(cls, obj: object) -> Readiness:
        obj = as_object(cls, obj)
        return cls(str_field(cls, obj, "status"), str(obj.get("reason", "")))


# GET /v1/info. A client reads it on first contact to pick a transport and its batch sizes. Where a
# server leaves a field out, the client assumes what these defaults say (a server from before the field).


@dataclass(frozen=True, slots=True)
class ServerLimits(WireObject):
    what: ClassVar[str] = "info 'limits'"
    capacity: int
    disk_capacity: int
    max_value_bytes: int
    max_batch_keys: int
    max_connections: int
    max_namespace_len: int = MAX_NAMESPACE_LEN
    max_key_len: int = MAX_KEY_LEN

    @classmethod
    def from_wire(cls, obj: object) -> ServerLimits:
        obj = as_object(cls, obj)
        return cls(**{name: count_field(cls, obj, name, default) for name, default in _ASSUMED_LIMITS.items()})


# What a client assumes of a limit the server does not state (0: unknown, the client does not use it).
_ASSUMED_LIMITS = {"capacity": 0, "disk_capacity": 0, "max_value_bytes": 64 << 20, "max_batch_keys": 1024,
                   "max_connections": 0, "max_namespace_len": MAX_NAMESPACE_LEN, "max_key_len": MAX_KEY_LEN}


@dataclass(frozen=True, slots=True)
class BulkEndpoint(WireObject):
    """Where the bulk protocol is spoken: on the HTTP port itself (same_port), or on `port`."""

    what: ClassVar[str] = "info 'bulk'"
    port: int | None
    same_port: bool = True
    magic: str = MAGIC.decode()
    version: int = VERSION

    @classmethod
    def from_wire(cls, obj: object) -> BulkEndpoint:
        obj = as_object(cls, obj)
        port = checked(cls, obj, "port", "an integer or null", lambda v: v is None or is_count(v), None)
        return cls(port, bool_field(cls, obj, "same_port", True), str_field(cls, obj, "magic", MAGIC.decode()),
                   count_field(cls, obj, "version", VERSION))


@dataclass(frozen=True, slots=True)
class ServerInfo(WireObject):
    what: ClassVar[str] = "server info"
    server: str
    version: str
    capabilities: list[str]  # "bulk", "batch", "lookup", ...: what the client may use
    put_existing: str  # what a put of a present key does: "overwrite"
    limits: ServerLimits
    bulk: BulkEndpoint
    auth: bool

    @classmethod
    def from_wire(cls, obj: object) -> ServerInfo:
        obj = as_object(cls, obj)
        return cls(str_field(cls, obj, "server", ""), str_field(cls, obj, "version", ""),
                   str_list_field(cls, obj, "capabilities", []), str_field(cls, obj, "put_existing", "overwrite"),
                   ServerLimits.from_wire(obj.get("limits", {})), BulkEndpoint.from_wire(obj.get("bulk", {})),
                   bool_field(cls, obj, "auth", False))
