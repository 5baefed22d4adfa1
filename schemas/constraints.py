"""The checks a record must pass, read off a schema's pydantic fields: one list for every validator.

The Spark jobs (bronze's decode, the batch twin) filter with :func:`spark_violation`, and the
data-quality suites (``batch_jobs.quality``) turn the same list into expectations, so a range written in
``schemas/`` is checked the same way everywhere.

>>> from schemas.events import Impression
>>> [c for c in constraints(Impression) if c.column == "position"]
... # doctest: +NORMALIZE_WHITESPACE
[Constraint(column='position', required=True, kind='int', ge=0, gt=None, le=100, lt=None,
            min_length=None, max_length=None, values=None)]
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from datetime import datetime

import annotated_types as at
from pydantic import BaseModel

BOUNDS = {"ge": at.Ge, "gt": at.Gt, "le": at.Le, "lt": at.Lt, "min_length": at.MinLen, "max_length": at.MaxLen}
KINDS = {str: "str", int: "int", float: "float", bool: "bool", datetime: "timestamp"}


@dataclass(frozen=True)
class Constraint:
    """What one column must hold: present (unless optional), its kind, its bounds and lengths."""

    column: str
    required: bool
    kind: str  # str | int | float | bool | timestamp | list | map
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    values: tuple[str, ...] | None = None  # a ``Literal`` field: the values it may take

    def describe(self) -> str:
        """The rule in words, for dead-letter reasons and reports."""
        parts = ["required" if self.required else "optional", self.kind]
        parts += [f"{op} {v}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if v is not None]
        if self.min_length is not None or self.max_length is not None:
            parts.append(f"length {self.min_length or 0}..{self.max_length if self.max_length is not None else ''}")
        if self.values is not None:
            parts.append(f"one of {', '.join(self.values)}")
        return f"{self.column}: " + ", ".join(parts)


def _kind(annotation: object) -> tuple[str, bool]:
    if annotation in KINDS:
        return KINDS[annotation], False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return _kind(next(a for a in args if a is not type(None)))[0], True
    if origin is list:
        return "list", False
    if origin is dict:
        return "map", False
    if origin is typing.Literal and all(isinstance(a, str) for a in args):
        return "str", False
    raise TypeError(f"no constraint kind for {annotation!r}")


def literal_values(annotation: object) -> tuple[str, ...] | None:
    """The values of a ``Literal[...]`` annotation (optional or not), else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return literal_values(inner[0]) if len(inner) == 1 else None
    return tuple(args) if origin is typing.Literal else None


def constraints(model: type[BaseModel]) -> list[Constraint]:
    """One :class:`Constraint` per field of ``model``, in field order."""
    out = []
    for name, info in model.model_fields.items():
        kind, optional = _kind(info.annotation)
        bounds: dict = {}
        for meta in info.metadata:
            for attr, cls in BOUNDS.items():
                if isinstance(meta, cls):
                    bounds[attr] = getattr(meta, attr)
        out.append(Constraint(name, required=not optional and info.is_required(), kind=kind,
                              values=literal_values(info.annotation), **bounds))
    return out


def spark_violation(model: type[BaseModel]):
    """A Spark Column: NULL for a row that passes every constraint, else the first broken rule in words."""
    from pyspark.sql import functions as F

    reason = F.lit(None).cast("string")
    for c in reversed(constraints(model)):
        col = F.col(c.column)
        broken = []
        if c.required:
            broken.append(col.isNull())
        size = F.length(col) if c.kind == "str" else F.size(col) if c.kind == "list" else None
        checks = [(c.ge, col < F.lit(c.ge)), (c.gt, col <= F.lit(c.gt)), (c.le, col > F.lit(c.le)),
                  (c.lt, col >= F.lit(c.lt))] if c.kind in ("int", "float") else []
        if size is not None:
            checks += [(c.min_length, size < F.lit(c.min_length)), (c.max_length, size > F.lit(c.max_length))]
        broken += [cond for bound, cond in checks if bound is not None]
        if c.values is not None:
            broken.append(~col.isin(list(c.values)))
        if broken:
            cond = broken[0]
            for b in broken[1:]:
                cond = cond | b
            reason = F.when(F.coalesce(cond, F.lit(False)), F.lit(f"violates {c.describe()}")).otherwise(reason)
    return reason
