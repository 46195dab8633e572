"""The JSON objects on the wire, typed: bulk frame heads, and the HTTP API's JSON bodies.

Each is a frozen dataclass whose field names are the wire's names (nothing outside protocol/ spells
them). `to_wire()` gives the dict orjson writes, fields in declaration order, so the bytes stay what
they were; `from_wire(obj)` checks a decoded JSON object and raises ProtocolError saying what is wrong.

A bulk request's class names its op (`decode_request` picks the class from a frame's op). The replies
of lookup, exists and put mean the same over bulk frames and HTTP, so both front ends use one class each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import orjson

from .bulk import REPLY_BIT, Frame, Op, ProtocolError, encode_frame


class _Head:
    __slots__ = ()
    what: ClassVar[str]  # how an error message names this object

    def to_wire(self) -> dict[str, Any]:
        # Field values go out as they are (no deep copy like dataclasses.asdict): key lists can be long.
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire())

    @classmethod
    def from_wire(cls, obj: object):
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: bytes | bytearray | memoryview):
        """An HTTP body: JSON text, then `from_wire`."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"{cls.what} is not JSON: {exc}") from None
        return cls.from_wire(obj)


# --- field checks: each raises ProtocolError naming the object and the field ----------------------------


def _object(cls: type[_Head], obj: object) -> dict:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{cls.what} must be a JSON object")
    return obj


def _str(cls: type[_Head], obj: dict, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{cls.what} needs a string {name!r}")
    return value


def _int(cls: type[_Head], obj: dict, name: str) -> int:
    value = obj.get(name)
    if not _is_int(value) or value < 0:
        raise ProtocolError(f"{cls.what} needs {name!r}, an integer >= 0")
    return value


def _bool(cls: type[_Head], obj: dict, name: str) -> bool:
    value = obj.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"{cls.what} needs {name!r}, true or false")
    return value


def _strs(cls: type[_Head], obj: dict, name: str) -> list[str]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{cls.what} needs {name!r}, a list of strings")
    return value


def _ints(cls: type[_Head], obj: dict, name: str, minimum: int) -> list[int]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(_is_int(v) and v >= minimum for v in value):
        raise ProtocolError(f"{cls.what} needs {name!r}, a list of integers >= {minimum}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


# --- bulk requests --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthRequest(_Head):
    """Once per connection, before anything else, where the server checks tokens."""

    op: ClassVar[Op] = Op.AUTH
    what: ClassVar[str] = "AUTH head"
    token: str

    @classmethod
    def from_wire(cls, obj: object) -> AuthRequest:
        return cls(_str(cls, _object(cls, obj), "token"))


@dataclass(frozen=True, slots=True)
class PingRequest(_Head):
    """No fields: the frame carries no head at all."""

    op: ClassVar[Op] = Op.PING
    what: ClassVar[str] = "PING head"

    @classmethod
    def from_wire(cls, obj: object) -> PingRequest:
        _object(cls, obj)  # whatever it holds is ignored
        return cls()


@dataclass(frozen=True, slots=True)
class PutRequest(_Head):
    """The body is the values back to back, `sizes[i]` bytes for `keys[i]`."""

    op: ClassVar[Op] = Op.PUT
    what: ClassVar[str] = "PUT head"
    ns: str
    keys: list[str]
    sizes: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> PutRequest:
        obj = _object(cls, obj)
        request = cls(_str(cls, obj, "ns"), _strs(cls, obj, "keys"), _ints(cls, obj, "sizes", 0))
        if len(request.keys) != len(request.sizes):
            raise ProtocolError(f"{cls.what} has {len(request.keys)} keys but {len(request.sizes)} sizes")
        return request


@dataclass(frozen=True, slots=True)
class KeysRequest(_Head):
    """The head of the ops that name keys and carry no body (GET, LOOKUP, EXISTS, DELETE)."""

    op: ClassVar[Op]
    ns: str
    keys: list[str]

    @classmethod
    def from_wire(cls, obj: object):
        obj = _object(cls, obj)
        return cls(_str(cls, obj, "ns"), _strs(cls, obj, "keys"))


@dataclass(frozen=True, slots=True)
class GetRequest(KeysRequest):
    op: ClassVar[Op] = Op.GET
    what: ClassVar[str] = "GET head"


@dataclass(frozen=True, slots=True)
class LookupRequest(KeysRequest):
    op: ClassVar[Op] = Op.LOOKUP
    what: ClassVar[str] = "LOOKUP head"


@dataclass(frozen=True, slots=True)
class ExistsRequest(KeysRequest):
    op: ClassVar[Op] = Op.EXISTS
    what: ClassVar[str] = "EXISTS head"


@dataclass(frozen=True, slots=True)
class DeleteRequest(KeysRequest):
    op: ClassVar[Op] = Op.DELETE
    what: ClassVar[str] = "DELETE head"


Request = AuthRequest | PingRequest | PutRequest | GetRequest | LookupRequest | ExistsRequest | DeleteRequest
_REQUESTS: dict[int, type] = {
    cls.op: cls for cls in (AuthRequest, PingRequest, PutRequest, GetRequest, LookupRequest, ExistsRequest, DeleteRequest)
}


def decode_request(frame: Frame) -> Request:
    """The typed head of a request frame, by its op; ProtocolError for an unknown op or a bad head."""
    cls = _REQUESTS.get(frame.op)
    if cls is None:
        raise ProtocolError(f"unknown bulk op {frame.op}")
    return cls.from_wire(frame.head)


def encode_request(request_id: int, request: Request, body_len: int = 0) -> bytes:
    """Header + head of a request frame; the body follows as separate buffers."""
    return encode_frame(request.op, request_id, request.to_wire(), body_len)


# --- replies (bulk heads, and the same objects as HTTP JSON bodies) ----------------------------------------


@dataclass(frozen=True, slots=True)
class AuthReply(_Head):
    what: ClassVar[str] = "AUTH reply"
    ok: bool = True

    @classmethod
    def from_wire(cls, obj: object) -> AuthReply:
        return cls(_bool(cls, _object(cls, obj), "ok"))


@dataclass(frozen=True, slots=True)
class PingReply(_Head):
    what: ClassVar[str] = "PING reply"
    pong: bool = True

    @classmethod
    def from_wire(cls, obj: object) -> PingReply:
        return cls(_bool(cls, _object(cls, obj), "pong"))


@dataclass(frozen=True, slots=True)
class PutReply(_Head):
    """Bulk PUT and HTTP batch put: how many of the values were stored (the first `stored`, in order)."""

    what: ClassVar[str] = "put reply"
    stored: int

    @classmethod
    def from_wire(cls, obj: object) -> PutReply:
        return cls(_int(cls, _object(cls, obj), "stored"))


@dataclass(frozen=True, slots=True)
class GetReply(_Head):
    """Bulk GET: each key's value size, -1 for a miss; the body is the present values back to back."""

    what: ClassVar[str] = "GET reply"
    sizes: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> GetReply:
        return cls(_ints(cls, _object(cls, obj), "sizes", -1))

    @classmethod
    def from_frame(cls, frame: Frame, n_keys: int) -> GetReply:
        """Also checked against the request's key count and the body length: the body is read by them."""
        reply = cls.from_wire(frame.head)
        if len(reply.sizes) != n_keys or sum(max(s, 0) for s in reply.sizes) != frame.body_len:
            raise ProtocolError("GET reply sizes do not match its body")
        return reply


@dataclass(frozen=True, slots=True)
class LookupReply(_Head):
    """How many of the keys, from the first on, are present."""

    what: ClassVar[str] = "lookup reply"
    count: int

    @classmethod
    def from_wire(cls, obj: object) -> LookupReply:
        return cls(_int(cls, _object(cls, obj), "count"))


@dataclass(frozen=True, slots=True)
class ExistsReply(_Head):
    """Per key, 1 if present, else 0."""

    what: ClassVar[str] = "exists reply"
    present: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> ExistsReply:
        obj = _object(cls, obj)
        present = obj.get("present")
        if not isinstance(present, list) or not all(p in (0, 1) for p in present):
            raise ProtocolError(f"{cls.what} needs 'present', a list of 0 and 1")
        return cls(present)


@dataclass(frozen=True, slots=True)
class DeleteReply(_Head):
    what: ClassVar[str] = "DELETE reply"
    deleted: int

    @classmethod
    def from_wire(cls, obj: object) -> DeleteReply:
        return cls(_int(cls, _object(cls, obj), "deleted"))


@dataclass(frozen=True, slots=True)
class ErrorReply(_Head):
    """A refused request: a bulk reply with a non-zero status, or an HTTP error body."""

    what: ClassVar[str] = "error reply"
    error: str

    @classmethod
    def from_wire(cls, obj: object) -> ErrorReply:
        return cls(_str(cls, _object(cls, obj), "error"))


def error_message(obj: object, fallback: str) -> str:
    """What an error reply says; `fallback` where it says nothing readable (an empty head, a proxy's page)."""
    if isinstance(obj, dict) and "error" in obj:
        return str(obj["error"])
    return fallback


Reply = AuthReply | PingReply | PutReply | GetReply | LookupReply | ExistsReply | DeleteReply | ErrorReply


def encode_reply(request: Frame, reply: Reply, body_len: int = 0) -> bytes:
    """Header + head of the reply to `request`; the body follows as separate buffers."""
    return encode_frame(request.op | REPLY_BIT, request.request_id, reply.to_wire(), body_len)


def encode_error(request: Frame | None, status: int, message: str) -> bytes:
    """A refusal; with no request (the connection's framing is lost), op 0 and request id 0."""
    op = request.op if request is not None else 0
    rid = request.request_id if request is not None else 0
    return encode_frame(op | REPLY_BIT, rid, ErrorReply(message).to_wire(), 0, status)


# --- HTTP-only bodies -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeysBody(_Head):
    """The request body of /v1/lookup, /v1/exists and /v1/batch/get (the namespace is in the path)."""

    what: ClassVar[str] = "keys body"
    keys: list[str]

    @classmethod
    def from_wire(cls, obj: object) -> KeysBody:
        return cls(_strs(cls, _object(cls, obj), "keys"))


@dataclass(frozen=True, slots=True)
class KeysListing(_Head):
    """GET /v1/keys: keys most recently used first; `truncated` if the limit left some out."""

    what: ClassVar[str] = "keys listing"
    keys: list[str]
    truncated: bool

    @classmethod
    def from_wire(cls, obj: object) -> KeysListing:
        obj = _object(cls, obj)
        return cls(_strs(cls, obj, "keys"), _bool(cls, obj, "truncated"))


@dataclass(frozen=True, slots=True)
class Health(_Head):
    """GET /healthz."""

    what: ClassVar[str] = "health reply"
    status: str = "ok"

    @classmethod
    def from_wire(cls, obj: object) -> Health:
        return cls(_str(cls, _object(cls, obj), "status"))
