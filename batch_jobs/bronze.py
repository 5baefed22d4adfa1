"""Bronze: every raw Kafka record, landed once in Delta, with the offsets it came from.

``python -m batch_jobs.bronze --ds 2026-11-15`` reads, for each raw topic (impressions, clicks, conversions,
negative feedback, the campaign catalog, prediction logs), the records after the last offset already in its Delta
table up to the first record that arrived after the end of ``ds`` (the end offsets now, for today), and appends
them to ``<lake>/bronze/<topic>`` in one Delta commit per topic, partitioned by arrival day (``ds``).

Exactly once, without a separate offset store: each commit names the offset range it read in the Delta
commit's ``userMetadata`` (and every row keeps its ``kafka_partition``/``kafka_offset``), so the table itself
says where the next run starts: the newest commit's end offsets. A range that decodes to no rows (only
transaction markers or aborted records, normal with a transactional producer) is still committed, empty, so
its end moves on. A run killed before its commit left nothing, so the re-run reads the same range again; a
commit carries Delta's idempotent-write id (``txnAppId`` = the table, ``txnVersion`` = the sum of the start
offsets, which only grows), so two runs racing over one range write it once.

Data loss fails the run (:class:`DataLossError`, as Spark's ``failOnDataLoss``): records retention deleted
before they were landed (also in a partition added since the last run, whose records start at offset 0), or a
partition that now ends before what the table landed (the topic was deleted and re-created).
``--accept-data-loss`` lands what is left and records the loss in the commit's metadata.

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
from schemas.events import Campaign, Click, Conversion, Event, Impression, NegativeFeedback, PredictionLog
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
    Source("negative_feedback", NegativeFeedback),
    Source("campaigns", Campaign), Source("prediction_log", PredictionLog),
)
BY_MODEL: dict[type[Event], Source] = {s.model: s for s in SOURCES}


def table_path(settings: Settings, source: Source) -> str:
    return str(settings.lake_dir / "bronze" / source.table)


def _table_exists(spark, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


class DataLossError(RuntimeError):
    """Records the table should have landed are gone from the topic (retention, or a re-created topic)."""


BRONZE_JOB = "bronze"


def last_commit(spark, path: str) -> dict:
    """The metadata of the newest bronze commit of the table (``{}`` for a table without one)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    history = (DeltaTable.forPath(spark, path).history().where(F.col("userMetadata").isNotNull())
               .orderBy(F.col("version").desc()).select("userMetadata"))
    for (text,) in history.toLocalIterator():
        try:
            meta = json.loads(text)
        except ValueError:
            continue
        if isinstance(meta, dict) and meta.get("job") == BRONZE_JOB and isinstance(meta.get("end"), dict):
            return meta
    return {}


def recorded_end(commit: dict) -> dict[int, int]:
    """The end offsets a bronze commit's metadata recorded (every partition of the topic it read)."""
    return {int(p): int(o) for p, o in commit.get("end", {}).items()}


def landed_offsets(spark, path: str, previous: dict | None = None) -> dict[int, int]:
    """Per partition, the next offset to read: the end the newest bronze commit (``previous``, read from the
    table's history when not given) recorded. Only a table whose commits recorded no end (written before they
    did) is scanned: one past each partition's largest landed offset."""
    if not _table_exists(spark, path):
        return {}
    recorded = recorded_end(last_commit(spark, path) if previous is None else previous)
    if recorded:
        return recorded
    frame = spark.read.format("delta").load(path)
    if "kafka_partition" not in frame.columns:  # created empty (feature_repo.store.ensure_offline_tables)
        return {}
    return {int(r[0]): int(r[1]) + 1 for r in frame.groupBy("kafka_partition").max("kafka_offset").collect()}


@dataclass
class OffsetRange:
    """What one run reads per partition (``start`` to ``end``), the records retention deleted before they were
    landed (``lost``, per partition) and the partitions found re-created (``reset``: read from their start)."""

    start: dict[int, int]
    end: dict[int, int]
    lost: dict[int, int] = field(default_factory=dict)
    reset: list[int] = field(default_factory=list)

    def ranges(self) -> dict[int, tuple[int, int]]:
        """The non-empty ``(start, end)`` per partition."""
        return {p: (self.start[p], self.end[p]) for p in self.start if self.end[p] > self.start[p]}


def offset_range(settings: Settings, topic: str, landed: dict[int, int], end_ms: int | None,
                 accept_loss: bool = False) -> OffsetRange:
    """Per partition, start where the table ends, end at the first record stamped at or after ``end_ms`` (or
    the end now). With nothing landed yet (``landed`` empty) every partition starts at the topic's beginning;
    after that, a partition the table has never seen starts at 0 (it was added since).

    Raises :class:`DataLossError` when records the table should land are gone: retention deleted them (the
    topic now begins after the start), or the partition ends before the start (a deleted and re-created
    topic). With ``accept_loss`` such a partition is read from the topic's beginning, and the loss returned.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not parts:
            raise RuntimeError(f"bronze: topic {topic!r} does not exist")
        begin, latest = consumer.beginning_offsets(parts), consumer.end_offsets(parts)
        cut = dict(latest)
        if end_ms is not None:
            for tp, found in consumer.offsets_for_times({tp: end_ms for tp in parts}).items():
                if found is not None:
                    cut[tp] = min(cut[tp], found.offset)
    finally:
        consumer.close()
    out, problems = OffsetRange({}, {}), []
    for tp in parts:
        p = tp.partition
        want = landed.get(p, 0 if landed else begin[tp])
        if latest[tp] < want:
            problems.append(f"partition {p} ends at offset {latest[tp]:,}, before the {want:,} the table landed "
                            "up to: the topic was deleted and re-created")
            out.reset.append(p)
            want = begin[tp]
        elif begin[tp] > want:
            problems.append(f"partition {p}: offsets {want:,}..{begin[tp] - 1:,} were deleted by retention "
                            "before they were landed")
            out.lost[p] = begin[tp] - want
        out.start[p] = max(want, begin[tp])
        out.end[p] = max(cut[tp], out.start[p])
    if problems and not accept_loss:
        raise DataLossError(f"{topic}: records are lost: " + "; ".join(problems)
                            + " (pass --accept-data-loss to land what is left and record the loss)")
    return out


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
    span: OffsetRange
    days: list[str] = field(default_factory=list)  # arrival days this run added rows to
    raced: bool = False  # another run committed the same range first (nothing written by this one)


def land(spark, settings: Settings, source: Source, end_ms: int | None, accept_loss: bool = False) -> Landed:
    """Append one topic's new records to its bronze table in one Delta commit (an empty one when the range
    holds only transaction markers or aborted records, so the next run starts after it; none when the range
    is empty)."""
    from pyspark.sql import functions as F

    path, topic = table_path(settings, source), source.topic(settings)
    exists = _table_exists(spark, path)
    previous = last_commit(spark, path) if exists else {}
    span = offset_range(settings, topic, landed_offsets(spark, path, previous), end_ms, accept_loss)
    todo = span.ranges()
    if not todo:
        return Landed(source.table, 0, 0, span)
    # Delta's idempotent write skips a txnVersion not above the last one: the sum of the start offsets only
    # grows, except across a re-created partition, where the base moves past the last version.
    base = int(previous.get("txn_base", 0))
    if span.reset:  # (a commit from before "txn" was recorded used the sum of its start offsets)
        base = int(previous.get("txn", sum(int(o) for o in previous.get("start", {}).values()))) + 1
    txn = base + sum(span.start.values())
    rows = decode(read_range(spark, settings, topic, todo), source.model).cache()
    counts = rows.agg(F.count("*"), F.count("reject_reason")).first()
    days = sorted(r[0] for r in rows.select("ds").distinct().collect())
    meta = json.dumps({"job": BRONZE_JOB, "topic": topic, "start": span.start, "end": span.end, "txn": txn,
                       "txn_base": base, "lost": span.lost, "reset": span.reset})
    (rows.write.format("delta").mode("append").partitionBy("ds")
     .option("txnAppId", f"bronze:{source.table}").option("txnVersion", txn)
     .option("userMetadata", meta).option("mergeSchema", "true").save(path))
    rows.unpersist()
    if last_commit(spark, path).get("txn") != txn:  # Delta skipped the write: a racing run committed this range
        return Landed(source.table, 0, 0, span, raced=True)
    return Landed(source.table, int(counts[0]), int(counts[1]), span, days)


def read_bronze(spark, settings: Settings, model: type[Event], missing_ok: bool = False):
    """The valid events of ``model``'s bronze table (rejects left out), with ``arrival_ms`` and ``ds``.
    ``missing_ok``: a table nothing has landed in yet reads as empty (a sparse topic, such as negative feedback)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from batch_jobs.quality import quarantined_days

    source = BY_MODEL[model]
    path = table_path(settings, source)
    if missing_ok and not _table_exists(spark, path):
        meta = [T.StructField("arrival_ms", T.LongType()), T.StructField("kafka_partition", T.IntegerType()),
                T.StructField("kafka_offset", T.LongType()), T.StructField("ds", T.StringType())]
        return spark.createDataFrame([], T.StructType([*spark_schema(model).fields, *meta]))
    frame = spark.read.format("delta").load(path).where("reject_reason IS NULL")
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
    return (spark.read.format("kafka").options(**settings.kafka.spark_options())
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


MAX_REJECT_SHARE = 0.05  # more of a run's records rejected than this: a producer is broken, not a record


def check_landed(spark, settings: Settings, source: Source, landed: Landed) -> None:
    """Data quality of what this run landed (its offset ranges, per arrival day), not the whole day again every
    hour: the schema's expectations on the valid rows, and the share of rejected records (a few malformed
    records are dead letters; more than ``MAX_REJECT_SHARE`` of a day's landed records is an upstream failure).
    A critical failure quarantines the day (readers leave it out) and raises ``QualityError``."""
    from pyspark.sql import functions as F

    from batch_jobs.quality import QualityError, guard, quarantine

    mine = F.lit(False)
    for p, (start, end) in landed.span.ranges().items():
        mine = mine | ((F.col("kafka_partition") == p) & (F.col("kafka_offset") >= start)
                       & (F.col("kafka_offset") < end))
    rows = spark.read.format("delta").load(table_path(settings, source)).where(mine)
    table = f"bronze/{source.table}"
    for ds in landed.days:
        day = rows.where(F.col("ds") == ds)
        total, rejected = day.agg(F.count("*"), F.count("reject_reason")).first()
        if total and rejected / total > MAX_REJECT_SHARE:
            reason = (f"{rejected:,} of the {total:,} records landed were rejected ({rejected / total:.1%} > "
                      f"{MAX_REJECT_SHARE:.0%}): see the dead letters")
            where = quarantine(settings, table, ds, [reason])
            raise QualityError(f"{table} ds={ds}: {reason}\nquarantined: recorded in {where}")
        result = guard(day.where("reject_reason IS NULL"), source.model, table, ds, settings)
        print(f"bronze: quality of {source.table} {ds} (this run's records): passed, report "
              f"{result.report_path}", flush=True)


def run(ds: date | None, settings: Settings | None = None, sources: tuple[Source, ...] = SOURCES,
        quality: bool = True, accept_loss: bool = False) -> list[Landed]:
    """Land every source up to the end of ``ds`` (or now, when ``ds`` is None); with ``quality``, check
    every day each source added to (``batch_jobs.quality``)."""
    settings = settings or get_settings()
    spark = spark_session("bronze", settings)
    end_ms = day_bounds(ds)[1] if ds is not None else None
    out = []
    for source in sources:
        landed = land(spark, settings, source, end_ms, accept_loss)
        span = landed.span
        if landed.raced:
            print(f"bronze: {source.table}: offsets {span.start} -> {span.end} were landed by another run "
                  "meanwhile: nothing written", flush=True)
        else:
            print(f"bronze: {source.table}: {landed.records:,} records landed ({landed.rejected:,} rejected to "
                  f"the dead letters), offsets {span.start} -> {span.end}", flush=True)
        if span.lost or span.reset:
            print(f"bronze: DATA LOSS ACCEPTED {source.table}: {sum(span.lost.values()):,} records deleted by "
                  f"retention before they were landed (per partition {span.lost}), re-created partitions "
                  f"{span.reset} read from their start", flush=True)
        if quality and landed.days:  # a topic with nothing new (or nothing yet: no table) has no day to check
            check_landed(spark, settings, source, landed)
        out.append(landed)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.bronze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=date.fromisoformat, required=True,
                   help="UTC day, YYYY-MM-DD: land what arrived up to its end")
    p.add_argument("--accept-data-loss", action="store_true",
                   help="land what is left when records were lost (retention, a re-created topic) instead of "
                        "failing; the loss is recorded in the commit's metadata")
    a = p.parse_args(argv)
    try:
        landed = run(a.ds, accept_loss=a.accept_data_loss)
    except DataLossError as err:
        print(f"bronze: FAILED: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"bronze: {sum(x.records for x in landed):,} records, {sum(x.rejected for x in landed):,} rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
