"""Bronze: every raw Kafka record, landed once in Delta, with the offsets it came from.

``python -m batch_jobs.bronze --ds 2026-11-15`` reads, for each raw topic (impressions, clicks, conversions,
the campaign catalog, prediction logs), the records after the last offset already in its Delta table up
to the first record that arrived after the end of ``ds`` (the end offsets now, for today), and appends them
to ``<lake>/bronze/<topic>`` in one Delta commit per topic, partitioned by arrival day (``ds``).

Exactly once, without a separate offset store: every row keeps its ``kafka_partition``/``kafka_offset``,
so the table itself says where the next run starts (the largest offset per partition, plus one). A run
killed before its commit left nothing, so the re-run reads the same range again; a commit names its range
in the Delta commit's ``userMetadata`` and carries Delta's idempotent-write id (``txnAppId`` = the table,
``txnVersion`` = the sum of the start offsets), so two runs racing over one range write it once.

Records that do not decode, or break a constraint of their schema (``schemas.constraints``), are kept in
the same commit with ``reject_reason`` set and their payload: those rows are the bronze dead letters
(:func:`dead_letters`); every reader of valid events goes through :func:`read_bronze`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import date

from batch_jobs.days import day_bounds
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.constraints import spark_violation
from schemas.events import Campaign, Click, Conversion, Event, Impression, PredictionLog
from schemas.spark import spark_schema

MAX_PAYLOAD_CHARS = 64 * 1024
CORRUPT = "_corrupt_record"
META = ["kafka_partition", "kafka_offset", "arrival_ms", "reject_reason", "payload", "ds"]


@dataclass(frozen=True)
class Source:
    """One raw topic and the schema of its records."""

    table: str  # folder under <lake>/bronze
    model: type[Event]

    def topic(self, settings: Settings) -> str:
        return getattr(settings.topics, self.table)


SOURCES: tuple[Source, ...] = (
    Source("impressions", Impression), Source("clicks", Click), Source("conversions", Conversion),
    Source("campaigns", Campaign), Source("prediction_log", PredictionLog),
)
BY_MODEL: dict[type[Event], Source] = {s.model: s for s in SOURCES}


def table_path(settings: Settings, source: Source) -> str:
    return str(settings.lake_dir / "bronze" / source.table)


def _table_exists(spark, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def landed_offsets(spark, path: str) -> dict[int, int]:
    """Per partition, the next offset to read: one past the largest offset already in the table."""
    if not _table_exists(spark, path):
        return {}
    frame = spark.read.format("delta").load(path)
    if "kafka_partition" not in frame.columns:  # created empty (feature_repo.store.ensure_offline_tables)
        return {}
    rows = frame.groupBy("kafka_partition").max("kafka_offset").collect()
    return {int(r[0]): int(r[1]) + 1 for r in rows}


def offset_range(settings: Settings, topic: str, landed: dict[int, int],
                 end_ms: int | None) -> tuple[dict[int, int], dict[int, int], int]:
    """(start, end, skipped) offsets per partition: start where the table ends (or the topic's beginning),
    end at the first record stamped at or after ``end_ms`` (or the end now). ``skipped`` counts records
    retention deleted before they were landed: they are reported, since they cannot be read any more."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            raise RuntimeError(f"bronze: topic {topic!r} does not exist")
        begin, end = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        if end_ms is not None:
            for tp, found in consumer.offsets_for_times({tp: end_ms for tp in parts}).items():
                if found is not None:
                    end[tp] = min(end[tp], found.offset)
        start, stop, skipped = {}, {}, 0
        for tp in parts:
            want = landed.get(tp.partition, begin[tp])
            skipped += max(begin[tp] - want, 0)
            start[tp.partition] = max(want, begin[tp])
            stop[tp.partition] = max(end[tp], start[tp.partition])
        return start, stop, skipped
    finally:
        consumer.close()


def decode(raw, model: type[Event]):
    """Kafka rows -> the model's columns, plus partition, offset, arrival, reject reason, payload and ds."""
    from pyspark.sql import functions as F

    value = F.col("value").cast("string")
    schema = spark_schema(model).add(CORRUPT, "string")
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
    parsed = raw.select(F.from_json(value, schema, options).alias("e"),
                        F.col("partition").alias("kafka_partition"), F.col("offset").alias("kafka_offset"),
                        F.unix_millis("timestamp").alias("arrival_ms"), value.alias("payload"),
                        F.to_date("timestamp").cast("string").alias("ds"),
                        F.filter("headers", lambda h: h["key"] == "schema").alias("schema_header"))
    header = F.col("schema_header")[0]["value"].cast("string")
    wrong_header = (F.size("schema_header") > 0) & (F.split(header, "/v")[0] != F.lit(model.NAME))
    reason = (F.when(F.col("e").isNull(), F.lit("not a JSON object"))
              .when(F.col(f"e.{CORRUPT}").isNotNull(),
                    F.lit(f"not {model.NAME} JSON: malformed, or a field of the wrong type"))
              .when(wrong_header, F.concat(F.lit(f"wrong schema: expected {model.NAME}, got "), header))
              .otherwise(spark_violation(model)))
    out = parsed.select(*[f"e.{n}" for n in model.field_names()], "kafka_partition", "kafka_offset",
                        "arrival_ms", "payload", "ds", reason.alias("reject_reason"))
    # Valid rows do not keep their payload (the columns hold it); rejects keep it, cut to 64 KiB.
    return out.withColumn("payload", F.when(F.col("reject_reason").isNull(), F.lit(None))
                          .otherwise(F.substring("payload", 1, MAX_PAYLOAD_CHARS)))


@dataclass
class Landed:
    table: str
    records: int
    rejected: int
    skipped_by_retention: int
    start: dict[int, int]
    end: dict[int, int]
    days: list[str] = field(default_factory=list)  # arrival days this run added rows to


def land(spark, settings: Settings, source: Source, end_ms: int | None) -> Landed:
    """Append one topic's new records to its bronze table (one Delta commit; nothing when there is none)."""
    from pyspark.sql import functions as F

    path, topic = table_path(settings, source), source.topic(settings)
    start, end, skipped = offset_range(settings, topic, landed_offsets(spark, path), end_ms)
    todo = {p: (start[p], end[p]) for p in start if end[p] > start[p]}
    if not todo:
        return Landed(source.table, 0, 0, skipped, start, end)
    rows = decode(read_range(spark, settings, topic, todo), source.model).cache()
    counts = rows.agg(F.count("*"), F.count("reject_reason")).first()
    days = sorted(r[0] for r in rows.select("ds").distinct().collect())
    meta = json.dumps({"job": "bronze", "topic": topic, "start": start, "end": end})
    (rows.write.format("delta").mode("append").partitionBy("ds")
     .option("txnAppId", f"bronze:{source.table}").option("txnVersion", sum(start.values()))
     .option("userMetadata", meta).option("mergeSchema", "true").save(path))
    rows.unpersist()
    return Landed(source.table, int(counts[0]), int(counts[1]), skipped, start, end, days)


def read_bronze(spark, settings: Settings, model: type[Event]):
    """The valid events of ``model``'s bronze table (rejects left out), with ``arrival_ms`` and ``ds``."""
    from pyspark.sql import functions as F

    from batch_jobs.quality import quarantined_days

    source = BY_MODEL[model]
    frame = spark.read.format("delta").load(table_path(settings, source)).where("reject_reason IS NULL")
    if bad := quarantined_days(settings, f"bronze/{source.table}"):  # kept, marked, not read downstream
        frame = frame.where(~F.col("ds").isin(sorted(bad)))
    # A field newer than every landed record (the table's schema grows when the first one lands) reads null.
    schema = spark_schema(model)
    fields = [F.col(n) if n in frame.columns else F.lit(None).cast(schema[n].dataType).alias(n)
              for n in model.field_names()]
    return frame.select(*fields, "arrival_ms", "kafka_partition", "kafka_offset", "ds")


def campaigns_as_of(spark, settings: Settings, end_ms: int | None = None):
    """The latest version of each campaign in the catalog (of those that arrived before ``end_ms``)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    catalog = read_bronze(spark, settings, Campaign)
    if end_ms is not None:
        catalog = catalog.where(F.col("arrival_ms") < end_ms)
    latest = Window.partitionBy("campaign_id").orderBy(F.col("event_time_ms").desc(), F.col("arrival_ms").desc())
    return catalog.withColumn("rank", F.row_number().over(latest)).where("rank = 1").drop("rank")


def read_range(spark, settings: Settings, topic: str, todo: dict[int, tuple[int, int]]):
    """The committed records of ``topic`` in the offset ranges ``todo`` (partition -> (start, end)), headers
    included (Spark's Kafka source with explicit offsets)."""
    return (spark.read.format("kafka").option("kafka.bootstrap.servers", settings.kafka.bootstrap_servers)
            .option("assign", json.dumps({topic: sorted(todo)})).option("includeHeaders", "true")
            .option("kafka.isolation.level", "read_committed")
            .option("startingOffsets", json.dumps({topic: {str(p): s for p, (s, _) in todo.items()}}))
            .option("endingOffsets", json.dumps({topic: {str(p): e for p, (_, e) in todo.items()}}))
            .load())


def dead_letters(spark, settings: Settings):
    """Every rejected record of every bronze table: topic, partition, offset, reason, payload, arrival."""
    from pyspark.sql import functions as F

    frames = []
    for source in SOURCES:
        path = table_path(settings, source)
        if _table_exists(spark, path):
            frames.append(spark.read.format("delta").load(path).where("reject_reason IS NOT NULL").select(
                F.lit(source.topic(settings)).alias("source_topic"), "kafka_partition", "kafka_offset",
                "reject_reason", "payload", "arrival_ms", "ds"))
    if not frames:
        return None
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def check_days(spark, settings: Settings, source: Source, days: list[str]) -> None:
    """Data quality of each arrival day a run added to (the schema's constraints on the valid rows); a
    critical failure quarantines the day and raises ``QualityError``."""
    from pyspark.sql import functions as F

    from batch_jobs.quality import guard

    valid = spark.read.format("delta").load(table_path(settings, source)).where("reject_reason IS NULL")
    for ds in days:
        result = guard(valid.where(F.col("ds") == ds), source.model, f"bronze/{source.table}", ds, settings)
        print(f"bronze: quality of {source.table} {ds}: passed, report {result.report_path}", flush=True)


def run(ds: date | None, settings: Settings | None = None, sources: tuple[Source, ...] = SOURCES,
        quality: bool = True) -> list[Landed]:
    """Land every source up to the end of ``ds`` (or now, when ``ds`` is None); with ``quality``, check
    every day each source added to (``batch_jobs.quality``)."""
    settings = settings or get_settings()
    spark = spark_session("bronze", settings)
    end_ms = day_bounds(ds)[1] if ds is not None else None
    out = []
    for source in sources:
        landed = land(spark, settings, source, end_ms)
        print(f"bronze: {source.table}: {landed.records:,} records landed ({landed.rejected:,} rejected to the "
              f"dead letters), offsets {landed.start} -> {landed.end}", flush=True)
        if landed.skipped_by_retention:
            print(f"bronze: WARNING {source.table}: {landed.skipped_by_retention:,} records were deleted by "
                  "retention before they were landed", flush=True)
        if quality and landed.days:  # a topic with nothing new (or nothing yet: no table) has no day to check
            check_days(spark, settings, source, landed.days)
        out.append(landed)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.bronze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=date.fromisoformat, required=True,
                   help="UTC day, YYYY-MM-DD: land what arrived up to its end")
    a = p.parse_args(argv)
    landed = run(a.ds)
    print(f"bronze: {sum(x.records for x in landed):,} records, {sum(x.rejected for x in landed):,} rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
