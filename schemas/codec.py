"""Kafka wire format derived from ``schemas.events``: JSON values, a string key, a ``schema`` header.

>>> from schemas.events import Click
>>> c = Click(click_id="c1", impression_id="i1", user_id=1, ad_id=2, event_time_ms=0)
>>> key, value, headers = encode(c)
>>> decode(Click, value, headers) == c
True
>>> decode(Click, b"{not json", headers)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
schemas.codec.InvalidEvent: not JSON: ...
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import ValidationError

from schemas.events import Event

SCHEMA_HEADER = "schema"
E = TypeVar("E", bound=Event)
Headers = list[tuple[str, bytes]]


class InvalidEvent(ValueError):
    """Raised by :func:`decode`; the message is the dead-letter reason."""


def encode(event: Event) -> tuple[bytes, bytes, Headers]:
    """Key, value and headers of one event."""
    return (event.key().encode(), orjson.dumps(event.model_dump()),
            [(SCHEMA_HEADER, event.schema_id().encode())])


def schema_headers(cls: type[Event]) -> Headers:
    return [(SCHEMA_HEADER, cls.schema_id().encode())]


def check_header(cls: type[Event], headers: Headers | None) -> None:
    """Raise :class:`InvalidEvent` when the ``schema`` header is missing its value, names another event or a
    newer version, or is not ``<name>/v<digits>`` (any header bytes give a reason, never another exception).

    >>> from schemas.events import Click
    >>> for bad in ("click/v²".encode(), b"click/v" + b"9" * 5000, None, b"click/v-1"):
    ...     try:
    ...         check_header(Click, [("schema", bad)])
    ...     except InvalidEvent as exc:
    ...         print(str(exc).split(" (")[0][:40])
    unsupported schema version: click/v²
    unsupported schema version: click/v99999
    schema header without a value
    unsupported schema version: click/v-1
    """
    for name, value in headers or ():
        if name == SCHEMA_HEADER:
            if not isinstance(value, bytes | bytearray):
                raise InvalidEvent("schema header without a value")
            found = bytes(value[:200]).decode(errors="replace")
            name_, _, version = found.partition("/v")
            if name_ != cls.NAME:
                raise InvalidEvent(f"wrong schema: expected {cls.NAME}, got {found}")
            # ASCII digits only ("²".isdigit() is true, and int() of 5,000 digits raises ValueError).
            if not (version.isascii() and version.isdigit() and len(version) <= 9) or int(version) > cls.VERSION:
                raise InvalidEvent(f"unsupported schema version: {found} (reader knows {cls.schema_id()})")


def load_object(value: bytes) -> dict:
    """The JSON object in ``value``; :class:`InvalidEvent` (``not JSON`` / ``not a JSON object``) otherwise."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"not a JSON object: {type(data).__name__}")
    return data


def decode(cls: type[E], value: bytes | None, headers: Headers | None = None) -> E:
    """Parse and validate one Kafka value as ``cls``; raise :class:`InvalidEvent` with the reason."""
    if value is None:
        raise InvalidEvent("empty value (tombstone)")
    check_header(cls, headers)
    data = load_object(value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<record>'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidEvent(f"invalid {cls.NAME}: {problems}") from None
