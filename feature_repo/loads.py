"""When gold rows became readable online: one row per view per successful ``feast materialize``, in Delta.

A gold row is stamped with the end of its day (when its values became true), but serving can read it only
after a materialization wrote it to the online store, an hour or more later. Before a materialize command
runs, ``stamps_present`` notes which ``event_timestamp`` values each gold table holds in the load's interval
(an interval may reach past days not computed yet: those are not loaded); once the command succeeded,
``record`` appends ``(view, start_ms, end_ms, stamps_ms, loaded_ms)`` to ``<lake>/feature_loads``.
``loaded_ms`` is the wall clock after the command returned, so it is never before the rows were readable.
An incremental load's start is the view's previous end (Feast's own rule); the first one has none.

``available`` gives each gold row ``available_ms``: the earliest load that found its ``event_timestamp``
(null: never loaded, so serving never had it). The training-set builder joins served
impressions on it (point-in-time by availability, ``batch_jobs.training_set``).

>>> spec = parse_materialize(["materialize", "2026-11-14T00:00:00", "2026-11-16T00:00:00", "--views", "ad_features"])
>>> spec.views, spec.start_ms, spec.end_ms
(['ad_features'], 1794614400000, 1794787200000)
>>> parse_materialize(["materialize-incremental", "2026-11-16T00:00:00"]).start_ms is None
True
>>> parse_materialize(["apply"]) is None
True
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from feature_repo.online import wall_ms
from infra.settings import Settings
from schemas.features import GOLD_TABLES

LOADED = "available_ms"


@dataclass(frozen=True)
class Materialization:
    """What one materialize command loads: the gold views and the event-time interval (start None: open)."""

    views: list[str]
    start_ms: int | None
    end_ms: int


def _ms(text: str) -> int:
    t = datetime.fromisoformat(text)
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def parse_materialize(args: list[str]) -> Materialization | None:
    """The loads a ``feast`` command line makes (only gold views: real-time rows are readable when the worker
    writes them), or None for any other command."""
    if not args or args[0] not in ("materialize", "materialize-incremental"):
        return None
    positional, views, i = [], [], 1
    while i < len(args):
        if args[i] in ("-v", "--views"):
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                views.append(args[i])
                i += 1
            continue
        if not args[i].startswith("-"):
            positional.append(args[i])
        i += 1
    gold = [t.VIEW for t in GOLD_TABLES]
    views = [v for v in (views or gold) if v in gold]
    if args[0] == "materialize":
        return Materialization(views, _ms(positional[0]), _ms(positional[1]))
    return Materialization(views, None, _ms(positional[0]))


def loads_path(settings: Settings) -> str:
    return str(settings.lake_dir / "feature_loads")


def _previous_ends(spark, settings: Settings) -> dict[str, int]:
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    path = loads_path(settings)
    if not DeltaTable.isDeltaTable(spark, path):
        return {}
    return {r["view"]: r["end"] for r in spark.read.format("delta").load(path)
            .groupBy("view").agg(F.max("end_ms").alias("end")).collect()}


def stamps_present(spark, settings: Settings, spec: Materialization) -> dict[str, tuple[int | None, list[int]]]:
    """Per view: the load's start and the ``event_timestamp`` values (ms) its gold table holds in the load's
    interval *now*. Taken before the load runs: a row that lands while it runs is not claimed."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from batch_jobs.gold import gold_path
    from schemas.features import BY_VIEW

    previous = _previous_ends(spark, settings) if spec.start_ms is None else {}
    out: dict[str, tuple[int | None, list[int]]] = {}
    for view in spec.views:
        start = spec.start_ms if spec.start_ms is not None else previous.get(view)
        path = gold_path(settings, BY_VIEW[view])
        stamps: list[int] = []
        if DeltaTable.isDeltaTable(spark, path):
            ts = F.unix_millis(F.col("event_timestamp"))
            inside = (ts <= F.lit(spec.end_ms)) & (F.lit(start is None) | (ts >= F.lit(start or 0)))
            stamps = sorted(r["t"] for r in spark.read.format("delta").load(path).where(inside)
                            .select(ts.alias("t")).distinct().collect())
        out[view] = (start, stamps)
    return out


class QuarantinedDays(RuntimeError):
    """A materialization would load a quarantined gold day."""


def refuse_quarantined(settings: Settings, present: dict[str, tuple[int | None, list[int]]], who: str) -> None:
    """Raise :class:`QuarantinedDays` (naming ``who`` refused, each view and its days) when a load would read a
    quarantined gold day; the one check both materialization paths make before writing anything."""
    if blocked := quarantined_in(settings, present):
        raise QuarantinedDays(f"{who}: not materialized: quarantined gold days in the interval: "
                              + "; ".join(f"{v}: {', '.join(d)}" for v, d in blocked.items())
                              + " (release them with batch_jobs.quality.release, or fix and re-run gold)")


def quarantined_in(settings: Settings, present: dict[str, tuple[int | None, list[int]]]) -> dict[str, list[str]]:
    """Per view, the quarantined gold days (``batch_jobs.quality``) among the stamps a load would read: a day
    quarantined after it was published (by a person, or a later check) must not reach the online store."""
    from batch_jobs.quality import quarantined_days

    out = {}
    for view, (_, stamps) in present.items():
        # A gold row of day ds is stamped at the day's end (the next midnight): its day is the stamp's, 1 ms back.
        days = {datetime.fromtimestamp((t - 1) / 1000, UTC).date().isoformat() for t in stamps}
        if bad := sorted(days & quarantined_days(settings, f"gold/{view}")):
            out[view] = bad
    return out


def record(spark, settings: Settings, spec: Materialization, present: dict | None = None,
           loaded_ms: int | None = None) -> int:
    """Append the loads of a materialization that succeeded (``present``: :func:`stamps_present` taken before
    it ran; now if not given); returns ``loaded_ms``."""
    from pyspark.sql import types as T

    present = stamps_present(spark, settings, spec) if present is None else present
    loaded_ms = wall_ms() if loaded_ms is None else loaded_ms
    schema = T.StructType([T.StructField("view", T.StringType(), False), T.StructField("start_ms", T.LongType()),
                           T.StructField("end_ms", T.LongType(), False),
                           T.StructField("stamps_ms", T.ArrayType(T.LongType(), False), False),
                           T.StructField("loaded_ms", T.LongType(), False)])
    rows = [(v, start, spec.end_ms, stamps, loaded_ms) for v, (start, stamps) in present.items()]
    spark.createDataFrame(rows, schema).write.format("delta").mode("append").option("mergeSchema", "true") \
        .save(loads_path(settings))
    return loaded_ms


def available(spark, settings: Settings, view: str, gold):
    """``gold`` (a view's rows) with ``available_ms``: the first load of ``view`` that found the row's
    ``event_timestamp`` in the gold table before it ran; null when none did."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    path = loads_path(settings)
    if not DeltaTable.isDeltaTable(spark, path):
        return gold.withColumn(LOADED, F.lit(None).cast("long"))
    first = (spark.read.format("delta").load(path).where(F.col("view") == F.lit(view))
             .select(F.explode("stamps_ms").alias("__stamp"), "loaded_ms")
             .groupBy("__stamp").agg(F.min("loaded_ms").alias(LOADED)))
    stamped = gold.withColumn("__stamp", F.unix_millis(F.col("event_timestamp")))
    return stamped.join(F.broadcast(first), on="__stamp", how="left").drop("__stamp")
