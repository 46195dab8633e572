"""What every typed JSON object on the wire shares (bulk heads in heads.py, HTTP bodies in bodies.py).

Each is a frozen dataclass whose field names are the wire's names: nothing outside protocol/ spells
them. `to_wire()` gives the dict orjson writes, fields in declaration order, so the bytes are the ones
the literal dicts wrote before; `from_wire(obj)` checks a decoded JSON object with the checks below,
which raise ProtocolError naming the object, the field and what it must be.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, ClassVar

import orjson

from .bulk import ProtocolError


class WireObject:
    __slots__ = ()
    what: ClassVar[str]  # how an error message names this object ("PUT head", "lookup reply", ...)

    def to_wire(self) -> dict[str, Any]:
        # Values go out as they are, not deep-copied as dataclasses.asdict would: key lists can be long.
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_wire() if isinstance(value, WireObject) else value
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire())

    @classmethod
    def from_wire(cls, obj: object) -> Any:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: bytes | bytearray | memoryview) -> Any:
        """An HTTP body: JSON text, then `from_wire`."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"{cls.what} is not JSON: {exc}") from None
        return cls.from_wire(obj)


REQUIRED: Any = object()  # a field's default meaning "it must be there"


def as_object(cls: type[WireObject], obj: object) -> dict:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{cls.what} must be a JSON object")
    return obj


def checked(cls: type[WireObject], obj: dict, name: str, expected: str, ok: Callable[[Any], bool],
          default: Any = REQUIRED) -> Any:
    """obj[name], checked with `ok`; `default` where it is absent, unless the field is REQUIRED."""
    if name not in obj:
        if default is REQUIRED:
            raise ProtocolError(f"{cls.what} needs {name!r}, {expected}")
        return default
    value = obj[name]
    if not ok(value):
        raise ProtocolError(f"{cls.what} needs {name!r}, {expected}")
    return value


def str_field(cls: type[WireObject], obj: dict, name: str, default: Any = REQUIRED) -> str:
    return checked(cls, obj, name, "a string", lambda v: isinstance(v, str), default)


def count_field(cls: type[WireObject], obj: dict, name: str, default: Any = REQUIRED) -> int:
    return checked(cls, obj, name, "an integer >= 0", is_count, default)


def bool_field(cls: type[WireObject], obj: dict, name: str, default: Any = REQUIRED) -> bool:
    return checked(cls, obj, name, "true or false", lambda v: isinstance(v, bool), default)


def str_list_field(cls: type[WireObject], obj: dict, name: str, default: Any = REQUIRED) -> list[str]:
    return checked(cls, obj, name, "a list of strings", is_strings, default)


def int_list_field(cls: type[WireObject], obj: dict, name: str, minimum: int) -> list[int]:
    def ok(v: object) -> bool:
        return isinstance(v, list) and all(is_int(x) and x >= minimum for x in v)

    return checked(cls, obj, name, f"a list of integers >= {minimum}", ok)


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a size


def is_count(v: object) -> bool:
    return is_int(v) and v >= 0  # type: ignore[operator]


def is_strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def is_flags(v: object) -> bool:
    return isinstance(v, list) and all(x in (0, 1) for x in v)
