"""The real-time features' offline log: the rows the real-time worker wrote, landed per view in Delta.

``python -m batch_jobs.realtime_log --ds 2026-11-15`` reads the ``realtime_features`` topic (one record per
row the worker wrote to the online store; header ``view``) and appends each view's rows to
``<lake>/realtime/<view>`` (``schemas.features`` ``UserRealtime``, ``AdRealtime``, ``AdvertiserRealtime``,
partitioned by the row's day). These tables are the batch sources of Feast's push sources and what the
training-set builder joins as of each impression. Each row keeps ``written_ms``, its record's Kafka timestamp:
the worker sends the record after the row's online write, so this is when serving could first read the row
(the training-set builder joins served impressions on it: point-in-time by availability).

Exactly once per table, as bronze does it: every row keeps ``kafka_partition``/``kafka_offset``, and each
table takes only the records after its own largest offset per partition, so a run killed between two
tables' commits lands the rest on the next run without repeating what one table already has.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from batch_jobs.bronze import landed_offsets, offset_range, read_range
from batch_jobs.days import day_bounds
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.features import LOG_ORDER, REALTIME_TABLES, FeatureRow
from schemas.spark import spark_schema

WRITTEN = "written_ms"  # when the row became readable: its log record's Kafka timestamp (after the online write)


def realtime_path(settings: Settings, table: type[FeatureRow]) -> str:
    return str(settings.lake_dir / "realtime" / table.VIEW)


def log_schema(table: type[FeatureRow]):
    """The JSON the worker logs: the row's fields, with ``event_timestamp`` in epoch milliseconds."""
    from pyspark.sql import types as T

    schema = spark_schema(table)
    return T.StructType([T.StructField(f.name, T.LongType() if f.name == "event_timestamp" else f.dataType, True)
                         for f in schema.fields])


def land(spark, settings: Settings, end_ms: int | None) -> dict[str, int]:
    """Append every view's new rows; return rows landed per view."""
    from pyspark.sql import functions as F

    topic = settings.topics.realtime_features
    starts = {t.VIEW: landed_offsets(spark, realtime_path(settings, t)) for t in REALTIME_TABLES}
    # Read from the earliest offset any table still needs.
    earliest = {p: min(s.get(p, 0) for s in starts.values()) for s in starts.values() for p in s}
    if any(not s for s in starts.values()):
        earliest = {}
    span = offset_range(settings, topic, earliest, end_ms)  # raises DataLossError on lost records
    todo = {p: (span.start[p], span.end[p]) for p in span.start if span.end[p] > span.start[p]}
    out = {t.VIEW: 0 for t in REALTIME_TABLES}
    if not todo:
        return out
    raw = (read_range(spark, settings, topic, todo)
           .select(F.col("value").cast("string").alias("value"), F.col("partition").alias("kafka_partition"),
                   F.col("offset").alias("kafka_offset"), F.unix_millis("timestamp").alias(WRITTEN),
                   F.filter("headers", lambda h: h["key"] == "view")[0]["value"].cast("string").alias("view"))
           .cache())
    for table in REALTIME_TABLES:
        mine = starts[table.VIEW]
        after = F.lit(True)
        for p, first in mine.items():  # only what this table does not have yet
            after = after & ((F.col("kafka_partition") != p) | (F.col("kafka_offset") >= first))
        rows = (raw.where((F.col("view") == table.VIEW) & after)
                .select(F.from_json("value", log_schema(table)).alias("r"), "kafka_partition", "kafka_offset",
                        WRITTEN)
                .select("r.*", "kafka_partition", "kafka_offset", WRITTEN)
                .withColumn("event_timestamp", F.timestamp_millis("event_timestamp"))
                # Several rows of one entity share an event time (a late event rewrites the row without moving
                # it; so do a request's impressions): Feast takes the one with the largest LOG_ORDER, the row
                # written last (an entity's rows are in one partition, in write order). Deterministic on replay.
                .withColumn(LOG_ORDER, F.timestamp_micros("kafka_offset"))
                .withColumn("ds", F.to_date("event_timestamp").cast("string")))
        n = rows.count()
        if n:
            (rows.write.format("delta").mode("append").partitionBy("ds").option("mergeSchema", "true")
             .option("txnAppId", f"realtime_log:{table.VIEW}")
             .option("txnVersion", sum(mine.values()) if mine else 0).save(realtime_path(settings, table)))
        out[table.VIEW] = n
    raw.unpersist()
    return out


def run(ds: date | None, settings: Settings | None = None) -> dict[str, int]:
    settings = settings or get_settings()
    spark = spark_session("realtime_log", settings)
    from feature_repo.store import ensure_offline_tables

    ensure_offline_tables(spark, settings)
    landed = land(spark, settings, day_bounds(ds)[1] if ds is not None else None)
    for view, n in landed.items():
        print(f"realtime_log: {view}: {n:,} rows landed in {settings.lake_dir / 'realtime' / view}", flush=True)
    return landed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.realtime_log", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=date.fromisoformat, required=True,
                   help="UTC day, YYYY-MM-DD: land what arrived up to its end")
    run(p.parse_args(argv).ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
