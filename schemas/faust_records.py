"""faust Records derived from ``schemas.events``, for agents and tables that want typed values.

Workers that read raw topics decode with ``schemas.codec.decode`` instead, so that a bad event becomes
a dead letter rather than a faust decode error.
"""

from __future__ import annotations

from functools import cache

from schemas.events import Event


@cache
def faust_record(cls: type[Event]):
    """A ``faust.Record`` subclass with the same fields, defaults and order as ``cls``."""
    import faust

    annotations, defaults = {}, {}
    for name, info in cls.model_fields.items():
        annotations[name] = info.annotation
        if not info.is_required():
            defaults[name] = info.default
    namespace = {"__annotations__": annotations, **defaults, "__module__": __name__}
    return type(f"{cls.__name__}Record", (faust.Record,), namespace, serializer="json",
                namespace=f"adsstream.{cls.schema_id()}")
