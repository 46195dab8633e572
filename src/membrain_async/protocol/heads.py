"""Bulk frame heads, typed: a request class per op, and the replies (lookup, exists, put and errors are
the HTTP API's reply bodies too, so both front ends use one class each). See wire.py for what every
one of them shares; bodies.py holds the JSON bodies only HTTP has.

A request's class names its op: `decode_request` picks the class from a frame's op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, get_args

from .bulk import REPLY_BIT, Frame, Op, ProtocolError, encode_frame
from .wire import (WireObject, as_object, bool_field, checked, count_field, int_list_field, is_flags, str_field,
                   str_list_field)


# --- bulk requests --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthRequest(WireObject):
    """Once per connection, before anything else, where the server checks tokens."""

    op: ClassVar[Op] = Op.AUTH
    what: ClassVar[str] = "AUTH head"
    token: str

    @classmethod
    def from_wire(cls, obj: object) -> AuthRequest:
        return cls(str_field(cls, as_object(cls, obj), "token"))


@dataclass(frozen=True, slots=True)
class PingRequest(WireObject):
    """No fields: the frame carries no head at all."""

    op: ClassVar[Op] = Op.PING
    what: ClassVar[str] = "PING head"

    @classmethod
    def from_wire(cls, obj: object) -> PingRequest:
        as_object(cls, obj)  # whatever it holds is ignored
        return cls()


@dataclass(frozen=True, slots=True)
class PutRequest(WireObject):
    """The body is the values back to back, `sizes[i]` bytes for `keys[i]`."""

    op: ClassVar[Op] = Op.PUT
    what: ClassVar[str] = "PUT head"
    ns: str
    keys: list[str]
    sizes: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> PutRequest:
        obj = as_object(cls, obj)
        request = cls(str_field(cls, obj, "ns"), str_list_field(cls, obj, "keys"), int_list_field(cls, obj, "sizes", 0))
        if len(request.keys) != len(request.sizes):
            raise ProtocolError(f"{cls.what} has {len(request.keys)} keys but {len(request.sizes)} sizes")
        return request


@dataclass(frozen=True, slots=True)
class KeysRequest(WireObject):
    """The head of the ops that name keys and carry no body (GET, LOOKUP, EXISTS, DELETE)."""

    op: ClassVar[Op]
    ns: str
    keys: list[str]

    @classmethod
    def from_wire(cls, obj: object):
        obj = as_object(cls, obj)
        return cls(str_field(cls, obj, "ns"), str_list_field(cls, obj, "keys"))


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
_REQUESTS: dict[int, type] = {cls.op: cls for cls in get_args(Request)}


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
class AuthReply(WireObject):
    what: ClassVar[str] = "AUTH reply"
    ok: bool = True

    @classmethod
    def from_wire(cls, obj: object) -> AuthReply:
        return cls(bool_field(cls, as_object(cls, obj), "ok"))


@dataclass(frozen=True, slots=True)
class PingReply(WireObject):
    what: ClassVar[str] = "PING reply"
    pong: bool = True

    @classmethod
    def from_wire(cls, obj: object) -> PingReply:
        return cls(bool_field(cls, as_object(cls, obj), "pong"))


@dataclass(frozen=True, slots=True)
class PutReply(WireObject):
    """Bulk PUT and HTTP batch put: how many of the values were stored (the first `stored`, in order)."""

    what: ClassVar[str] = "put reply"
    stored: int

    @classmethod
    def from_wire(cls, obj: object) -> PutReply:
        return cls(count_field(cls, as_object(cls, obj), "stored"))


@dataclass(frozen=True, slots=True)
class GetReply(WireObject):
    """Bulk GET: each key's value size, -1 for a miss; the body is the present values back to back."""

    what: ClassVar[str] = "GET reply"
    sizes: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> GetReply:
        return cls(int_list_field(cls, as_object(cls, obj), "sizes", -1))

    @classmethod
    def from_frame(cls, frame: Frame, n_keys: int) -> GetReply:
        """Also checked against the request's key count and the body length: the body is read by them."""
        reply = cls.from_wire(frame.head)
        if len(reply.sizes) != n_keys or sum(max(s, 0) for s in reply.sizes) != frame.body_len:
            raise ProtocolError("GET reply sizes do not match its body")
        return reply


@dataclass(frozen=True, slots=True)
class LookupReply(WireObject):
    """How many of the keys, from the first on, are present."""

    what: ClassVar[str] = "lookup reply"
    count: int

    @classmethod
    def from_wire(cls, obj: object) -> LookupReply:
        return cls(count_field(cls, as_object(cls, obj), "count"))


@dataclass(frozen=True, slots=True)
class ExistsReply(WireObject):
    """Per key, 1 if present, else 0."""

    what: ClassVar[str] = "exists reply"
    present: list[int]

    @classmethod
    def from_wire(cls, obj: object) -> ExistsReply:
        return cls(checked(cls, as_object(cls, obj), "present", "a list of 0 and 1", is_flags))


@dataclass(frozen=True, slots=True)
class DeleteReply(WireObject):
    what: ClassVar[str] = "DELETE reply"
    deleted: int

    @classmethod
    def from_wire(cls, obj: object) -> DeleteReply:
        return cls(count_field(cls, as_object(cls, obj), "deleted"))


@dataclass(frozen=True, slots=True)
class ErrorReply(WireObject):
    """A refused request: a bulk reply with a non-zero status, or an HTTP error body."""

    what: ClassVar[str] = "error reply"
    error: str

    @classmethod
    def from_wire(cls, obj: object) -> ErrorReply:
        return cls(str_field(cls, as_object(cls, obj), "error"))


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
