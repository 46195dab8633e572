"""The JSON bodies only the HTTP API has, typed (its lookup, exists, put and error replies are the bulk
replies in heads.py). See wire.py for what they share. /v1/stats stays a free-form document: it is
read by people and dashboards, not by the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .wire import WireObject, as_object, flag, string, strings


@dataclass(frozen=True, slots=True)
class KeysBody(WireObject):
    """The request body of /v1/lookup, /v1/exists and /v1/batch/get (the namespace is in the path)."""

    what: ClassVar[str] = "keys body"
    keys: list[str]

    @classmethod
    def from_wire(cls, obj: object) -> KeysBody:
        return cls(strings(cls, as_object(cls, obj), "keys"))


@dataclass(frozen=True, slots=True)
class KeysListing(WireObject):
    """GET /v1/keys: keys most recently used first; `truncated` if the limit left some out."""

    what: ClassVar[str] = "keys listing"
    keys: list[str]
    truncated: bool

    @classmethod
    def from_wire(cls, obj: object) -> KeysListing:
        obj = as_object(cls, obj)
        return cls(strings(cls, obj, "keys"), flag(cls, obj, "truncated"))


@dataclass(frozen=True, slots=True)
class Health(WireObject):
    """GET /healthz."""

    what: ClassVar[str] = "health reply"
    status: str = "ok"

    @classmethod
    def from_wire(cls, obj: object) -> Health:
        return cls(string(cls, as_object(cls, obj), "status"))
