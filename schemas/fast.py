"""A compiled decoder for the hot path, derived from ``schemas.events`` (fields, types and ranges).

For every event class a ``msgspec.Struct`` is generated from the pydantic model: the same fields, types,
optionality, defaults and constraints (``ge``/``le``/``gt``/``lt``/``min_length``/``max_length``), read from the
models' public field metadata, so nothing is written twice. :class:`FastDecoder` does what
``schemas.codec.decode`` does, with the same reason kinds for bad input (the dead-letter counters key on them).

Good records take msgspec's JSON decoder straight to the Struct. Anything it rejects is parsed again the way the
codec parses it (``schemas.codec.load_object``: orjson) and converted with msgspec, so JSON quirks (duplicate
keys, integers beyond 64 bits, invalid UTF-8, nesting depth) end the same way as on the pydantic path.

>>> from schemas.events import Click
>>> d = FastDecoder(Click)
>>> d.decode_dict(b'{"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2, "event_time_ms": 5}')
{'click_id': 'c', 'impression_id': 'i', 'user_id': 1, 'ad_id': 2, 'event_time_ms': 5}
>>> d.decode(b'{"click_id": "c", "impression_id": "i", "user_id": -1, "ad_id": 2, "event_time_ms": 5}')
Traceback (most recent call last):
...
schemas.codec.InvalidEvent: invalid click: user_id: Expected `int` >= 0
>>> d.decode(b'[1, 2]')
Traceback (most recent call last):
...
schemas.codec.InvalidEvent: not a JSON object: list
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any

import annotated_types as at
import msgspec

from schemas.codec import SCHEMA_HEADER, Headers, InvalidEvent, check_header, load_object
from schemas.events import ALL_EVENTS, Event

_BOUNDS = {at.Ge: "ge", at.Le: "le", at.Gt: "gt", at.Lt: "lt", at.MinLen: "min_length", at.MaxLen: "max_length"}
# msgspec reads any integer; orjson (the pydantic path's parser) reads those beyond 64 bits as floats, which a
# strict int field rejects. The compiled decoder bounds ints to int64 (msgspec's limit for bounds); the rare
# uint64 above it goes the slow way, which lets orjson decide.
_INT64 = {"ge": -(2**63), "le": 2**63 - 1}
_MISSING = re.compile(r"Object missing required field `(.+)`")


def _constrained(tp: Any, metadata: list, int64: bool) -> Any:
    """``tp`` with the pydantic constraints in ``metadata`` (and int64 bounds) as a ``msgspec.Meta``."""
    bounds = {}
    for m in metadata:
        name = _BOUNDS.get(type(m))
        if name is None:
            raise TypeError(f"no msgspec equivalent for pydantic constraint {m!r}")
        bounds[name] = getattr(m, name)
    if tp is int and int64:
        bounds["ge"] = max(bounds.get("ge", _INT64["ge"]), _INT64["ge"])
        bounds["le"] = min(bounds.get("le", _INT64["le"]), _INT64["le"])
    return Annotated[tp, msgspec.Meta(**bounds)] if bounds else tp


def _field_type(annotation: Any, metadata: list, int64: bool) -> Any:
    """The msgspec type of one field; on ``X | None`` the constraints apply to ``X``, as in pydantic."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _constrained(inner[0], metadata, int64) | None
    return _constrained(annotation, metadata, int64)


def struct_of(cls: type[Event], int64: bool = True) -> type[msgspec.Struct]:
    """The msgspec Struct with ``cls``'s fields, types, defaults and constraints (ints within int64 if ``int64``)."""
    config = cls.model_config
    if not config.get("strict") or config.get("extra", "ignore") == "allow":
        raise TypeError(f"{cls.__name__}: only strict models without extra='allow' have a Struct twin")
    fields = []
    for name, info in cls.model_fields.items():
        if info.alias and info.alias != name:
            raise TypeError(f"{cls.__name__}.{name}: aliases are not supported")
        tp = _field_type(info.annotation, info.metadata, int64)
        if info.is_required():
            fields.append((name, tp))
        elif info.default_factory is not None:
            fields.append((name, tp, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((name, tp, info.default))
    return msgspec.defstruct(f"{cls.__name__}Struct", fields, kw_only=True, frozen=bool(config.get("frozen")),
                             forbid_unknown_fields=config.get("extra") == "forbid")


STRUCTS: dict[type[Event], type[msgspec.Struct]] = {cls: struct_of(cls) for cls in ALL_EVENTS}


def to_dict(struct: msgspec.Struct) -> dict[str, Any]:
    """The fields of a decoded event as a dict (what ``model_dump()`` gives on the pydantic path)."""
    return msgspec.structs.asdict(struct)


def _reason(exc: msgspec.ValidationError) -> str:
    """msgspec's message as ``<field>: <message>``, like the codec's pydantic reasons."""
    message, _, path = str(exc).partition(" - at `$")
    missing = _MISSING.fullmatch(message)
    if missing:
        return f"{missing.group(1)}: Field required"
    return f"{path.rstrip('`').lstrip('.') or '<record>'}: {message}"


class FastDecoder:
    """Decode and validate Kafka values as ``cls`` (its Struct), raising ``InvalidEvent`` with the reason."""

    def __init__(self, cls: type[Event]):
        self.cls = cls
        self.struct = STRUCTS[cls]
        self._decoder = msgspec.json.Decoder(self.struct)
        self._wide = struct_of(cls, int64=False)
        self._schema_id = cls.schema_id().encode()

    def decode(self, value: bytes | None, headers: Headers | None = None) -> msgspec.Struct:
        """What ``schemas.codec.decode(cls, value, headers)`` does, returning the Struct."""
        if value is None:
            raise InvalidEvent("empty value (tombstone)")
        for name, raw in headers or ():
            if name == SCHEMA_HEADER and raw != self._schema_id:  # the reader's own id needs no parsing
                check_header(self.cls, headers)
                break
        try:
            if not value.isascii():
                value.decode()  # msgspec skips ignored keys unread; orjson rejects invalid UTF-8 anywhere
            return self._decoder.decode(value)
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            pass
        data = load_object(value)  # bad JSON or not an object: the codec's own reasons
        try:
            checked = msgspec.convert(data, self._wide, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"invalid {self.cls.NAME}: {_reason(exc)}") from None
        return self.struct(**to_dict(checked))  # a Struct's __init__ does not check: same class either way

    def decode_dict(self, value: bytes | None, headers: Headers | None = None) -> dict[str, Any]:
        """The decoded event as a dict of its fields."""
        return to_dict(self.decode(value, headers))
