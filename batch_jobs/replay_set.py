"""Replay set: training rows built from the prediction log (the features exactly as served) and matured labels.

``python -m batch_jobs.replay_set --start 2026-11-10 --end 2026-11-16 [--negative-rate 0.1] [--seed 7]``
reads the prediction-log records landed in bronze (``schemas.events.PredictionLog``), keeps the replayable
ones, joins them with the silver labels of the days in [start, end] on ``impression_id`` (inner: an
impression whose labels have not matured, or that has no replayable log, has no row), downsamples the
negatives exactly as the training set does and replaces those ``ds`` partitions of the Delta table
``<lake>/training/replay_set``. Each written day then goes through the data-quality gate.

Replayable records: version-2 records from a ranker, i.e. ``model_version`` is not the simulator's baseline
(``sim-serving-v1``, whose records carry three toy features) and the record carries the v2 fields
(``feature_lists`` present, a non-empty ``placement``; bronze leaves them null for a v1 payload). Several
records of one impression (a producer's retry, a replayed spool) count once: the first to arrive wins.

Columns are the training set's (``batch_jobs.training_set.build``), with the same names and Spark types, so
``trainers.datasets`` and ``trainers.data.encode`` read both alike:

- ids and context (user, ad, advertiser, campaign, category, placement, device, position, bid) as the log
  has them, i.e. as the model saw them (``category_id`` is -1 where serving did not know the ad);
- labels and ``impression_time_ms`` from silver; ``sample_rate`` as in the training set;
- every ``<view>__<feature>`` column of the training set: scalar ones from the log's ``features``, list ones
  from its ``feature_lists``, cast to the training set's type (arrays: the same element type, but Spark's
  ``containsNull`` stays true); a feature the log lacks is null;
- then ``model_version``, ``served_pctr``, ``served_pcvr``, ``arm``, ``explored`` (what serving did), ``ds``.

Downsampling uses :func:`batch_jobs.training_set.keep_column`: with the same rate and seed, the replay set
and the training set keep the same impressions.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta
from typing import ClassVar

from pydantic import Field

from batch_jobs.days import day_bounds
from batch_jobs.training_set import (
    CLICKED_SHARE,
    feature_columns,
    keep_column,
    quality_checks,
    replace_days,
    silver_days,
)
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.events import BASELINE_MODEL_VERSION, PredictionLog
from schemas.features import GOLD_TABLES, REALTIME_TABLES, TrainingRow

TABLE = "training/replay_set"
BASELINE_VERSION = BASELINE_MODEL_VERSION  # the simulator's own serving stand-in: v1 records, toy features
# The context the model saw: taken from the log, not from silver.
SERVED_CONTEXT = ("user_id", "ad_id", "advertiser_id", "campaign_id", "category_id", "placement", "position",
                  "device", "bid")
# What serving did, kept next to the training columns: column -> prediction-log field.
EXTRAS = {"model_version": "model_version", "served_pctr": "pctr", "served_pcvr": "pcvr", "arm": "arm",
          "explored": "explored"}
DAY_MS = 86_400_000


class ReplayRow(TrainingRow):
    """A replay-set row: a training row whose context is the served one (category -1 = unknown to serving),
    plus the model version, the served scores, the A/B arm and whether the slot was an exploration."""

    NAME: ClassVar[str] = "replay_row"

    category_id: int = Field(ge=-1, le=999)
    model_version: str = Field(min_length=1)
    served_pctr: float = Field(ge=0.0, le=1.0)
    served_pcvr: float = Field(ge=0.0, le=1.0)
    arm: str
    explored: bool


def replay_path(settings: Settings) -> str:
    return str(settings.lake_dir / "training" / "replay_set")


def training_feature_types() -> dict[str, object]:
    """Every ``<view>__<feature>`` column of the training set with its Spark type, in the set's order."""
    from schemas.spark import spark_schema

    out: dict[str, object] = {}
    for table in GOLD_TABLES + REALTIME_TABLES:
        schema = spark_schema(table)
        for name, col in zip(table.feature_names(), feature_columns(table), strict=True):
            out[col] = schema[name].dataType
    return out


def replayable(log):
    """The prediction-log rows training may replay: v2 records of a ranker (see the module docstring)."""
    from pyspark.sql import functions as F

    return log.where((F.col("model_version") != F.lit(BASELINE_VERSION)) & F.col("feature_lists").isNotNull()
                     & F.col("placement").isNotNull() & (F.col("placement") != F.lit("")))


def first_arrival(log):
    """One record per impression: the first to arrive (then the lowest offset)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy("impression_id").orderBy("arrival_ms", "kafka_partition", "kafka_offset")
    return log.withColumn("__rank", F.row_number().over(order)).where("__rank = 1").drop("__rank")


def flatten(log):
    """The log's maps as the training set's feature columns (absent -> null), typed like the training set."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    cols = []
    for col, dtype in training_feature_types().items():
        if isinstance(dtype, T.ArrayType):  # the log's arrays may hold nulls as far as Spark knows
            value = F.element_at(F.col("feature_lists"), F.lit(col)).cast(T.ArrayType(dtype.elementType, True))
        else:
            value = F.element_at(F.col("features"), F.lit(col)).cast(dtype)
        cols.append(value.alias(col))
    return cols


def logged_rows(spark, settings: Settings, start: date, end: date):
    """Replayable prediction-log records of impressions around [start, end] (one per impression), or None
    when bronze has no prediction log yet. The event-time filter is loose (a day either side): the silver
    day of the impression decides."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from batch_jobs.bronze import BY_MODEL, read_bronze, table_path

    if not DeltaTable.isDeltaTable(spark, table_path(settings, BY_MODEL[PredictionLog])):
        return None
    lo, hi = day_bounds(start)[0] - DAY_MS, day_bounds(end)[1] + DAY_MS
    log = read_bronze(spark, settings, PredictionLog)
    log = log.where(F.col("ds") >= F.lit((start - timedelta(days=1)).isoformat()))  # arrival never precedes
    log = log.where((F.col("event_time_ms") >= F.lit(lo)) & (F.col("event_time_ms") < F.lit(hi)))
    return first_arrival(replayable(log))


def empty(spark):
    """An empty frame with the replay set's columns."""
    from pyspark.sql import types as T

    from schemas.spark import spark_schema

    schema = spark_schema(TrainingRow)
    for col, dtype in training_feature_types().items():
        schema = schema.add(col, T.ArrayType(dtype.elementType, True) if isinstance(dtype, T.ArrayType) else dtype,
                            True)
    extras = spark_schema(ReplayRow)
    for col in EXTRAS:
        schema = schema.add(col, extras[col].dataType, True)
    return spark.createDataFrame([], schema.add("ds", T.StringType()))


def build(spark, settings: Settings, start: date, end: date, negative_rate: float = 0.1, seed: int = 7):
    """The replay rows of the silver days in [start, end] (not written): TrainingRow's columns, the training
    set's feature columns, the extras (``EXTRAS``), then ``ds``."""
    return _build(spark, settings, silver_days(spark, settings, start, end), logged_rows(spark, settings, start, end),
                  negative_rate, seed)


def _build(spark, settings: Settings, kept_days: list[str], log, negative_rate: float, seed: int):
    from pyspark.sql import functions as F

    from batch_jobs.silver import silver_path

    if not 0.0 < negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
    if not kept_days or log is None:
        if log is None:
            print("replay_set: no prediction log in bronze yet")
        return empty(spark)
    print(f"replay_set: silver days {', '.join(kept_days)}; negatives kept at {negative_rate} (seed {seed})")
    labels = (spark.read.format("delta").load(silver_path(settings)).where(F.col("ds").isin(kept_days))
              .select("impression_id", "impression_time_ms", "clicked", "converted", "click_time_ms",
                      "conversion_time_ms", "conversion_value", "negative_feedback", "ds"))
    served = log.select("impression_id", *SERVED_CONTEXT, *flatten(log),
                        *[F.col(field).alias(col) for col, field in EXTRAS.items()])
    frame = (served.join(labels, "impression_id", "inner").where(keep_column(negative_rate, seed))
             .withColumn("sample_rate", F.when(F.col("clicked"), F.lit(1.0)).otherwise(F.lit(float(negative_rate)))))
    return frame.select(*TrainingRow.model_fields, *training_feature_types(), *EXTRAS, "ds")


def unknown_features(log) -> list[str]:
    """Names in the logs' ``features``/``feature_lists`` that are no training-set column (they are not
    replayed: a serving/training naming mismatch shows up here)."""
    from pyspark.sql import functions as F

    if log is None:
        return []
    names = (log.select(F.explode(F.array_union(F.map_keys("features"), F.map_keys("feature_lists"))).alias("k"))
             .distinct().collect())
    known = set(training_feature_types())
    return sorted(r["k"] for r in names if r["k"] not in known)


def run(start: date, end: date, settings: Settings | None = None, negative_rate: float = 0.1, seed: int = 7,
        quality: bool = True) -> dict:
    """Build and replace the ``ds`` partitions of the silver days in [start, end] (a day without replayable
    rows is emptied); with ``quality``, gate each written day. Returns ``{"rows", "positives", "days",
    "warnings": {ds: [...]}, "unknown_features": [...]}``."""
    from pyspark.sql import functions as F

    from batch_jobs.quality import guard

    settings = settings or get_settings()
    spark = spark_session("replay_set", settings)
    replaced = silver_days(spark, settings, start, end)
    if not replaced:
        print("replay_set: nothing to write")
        return {"rows": 0, "positives": 0, "days": [], "warnings": {}, "unknown_features": []}
    log = logged_rows(spark, settings, start, end)
    unknown = unknown_features(log)
    if unknown:
        print(f"replay_set: WARNING logged features that are no training column (not replayed): {unknown}")
    frame = _build(spark, settings, replaced, log, negative_rate, seed).cache()
    path = replay_path(settings)
    try:
        counts = replace_days(frame, path, replaced)
    finally:
        frame.unpersist()
    written = sorted(counts)
    for ds in sorted(set(replaced) - set(counts)):
        print(f"replay_set: {ds}: no replayable logged impressions with matured labels (partition emptied)")
    table = spark.read.format("delta").load(path)
    warnings: dict[str, list[str]] = {}
    for ds in written:
        n, p = counts[ds]
        print(f"replay_set: {ds}: wrote {n:,} rows ({p:,} positives)" + ("; checking quality" if quality else ""),
              flush=True)
        if not quality:
            continue
        day = table.where(F.col("ds") == F.lit(ds)).withColumn(CLICKED_SHARE, F.col("clicked").cast("double"))
        result = guard(day, ReplayRow, TABLE, ds, settings, checks=quality_checks(negative_rate))
        warnings[ds] = list(result.warnings)
        for warning in result.warnings:
            print(f"replay_set: {ds}: warning: {warning}")
    return {"rows": sum(n for n, _ in counts.values()), "positives": sum(p for _, p in counts.values()),
            "days": written, "warnings": warnings, "unknown_features": unknown}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.replay_set", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=date.fromisoformat, required=True, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--end", type=date.fromisoformat, required=True, help="last UTC day (included), YYYY-MM-DD")
    p.add_argument("--negative-rate", type=float, default=0.1, help="share of negatives kept (default 0.1)")
    p.add_argument("--seed", type=int, default=7, help="seed of the downsampling hash (default 7)")
    p.add_argument("--no-quality", action="store_true", help="skip the data-quality gate")
    a = p.parse_args(argv)
    if a.end < a.start:
        p.error("--end is before --start")
    out = run(a.start, a.end, negative_rate=a.negative_rate, seed=a.seed, quality=not a.no_quality)
    print(f"replay_set: {out['rows']:,} rows, {out['positives']:,} positives, days {', '.join(out['days'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
