"""Spark StructTypes derived from ``schemas.events`` (imported lazily: pyspark is heavy).

>>> from schemas.events import Click
>>> [f.name for f in spark_schema(Click).fields]
['click_id', 'impression_id', 'user_id', 'ad_id', 'event_time_ms']
"""

from __future__ import annotations

import types
import typing
from datetime import datetime

from pydantic import BaseModel


def _spark_type(annotation: object):
    from pyspark.sql import types as T

    scalar = {str: T.StringType(), int: T.LongType(), float: T.DoubleType(), bool: T.BooleanType(),
              datetime: T.TimestampType()}
    if annotation in scalar:
        return scalar[annotation], False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _spark_type(inner[0])[0], True
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return T.StringType(), False
    if origin is list:
        return T.ArrayType(_spark_type(args[0])[0], containsNull=False), False
    if origin is dict and args[0] is str:
        return T.MapType(T.StringType(), _spark_type(args[1])[0]), False
    raise TypeError(f"no Spark type for {annotation!r}")


def spark_schema(cls: type[BaseModel]):
    """The StructType of ``cls``; optional fields are nullable, the rest are not."""
    from pyspark.sql import types as T

    fields = []
    for name, info in cls.model_fields.items():
        dtype, optional = _spark_type(info.annotation)
        fields.append(T.StructField(name, dtype, nullable=optional or not info.is_required()))
    return T.StructType(fields)
