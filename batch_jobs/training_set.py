"""Training set: silver rows with their gold features as of each impression's event time, negatives downsampled.

``python -m batch_jobs.training_set --start 2026-11-10 --end 2026-11-16 [--negative-rate 0.1] [--seed 7]``
reads the silver days in [start, end] (``schemas.events.LabeledImpression`` rows; days quarantined in
``silver/labeled_impressions`` are skipped), keeps every positive (clicked) row and a negative with probability
``negative_rate``, attaches the features of every gold view and replaces those ``ds`` partitions of the Delta
table ``<lake>/training/training_set`` (``schemas.features.TrainingRow`` plus the feature columns). Each
written day then goes through the data-quality gate (:func:`batch_jobs.quality.guard`).

Point-in-time correctness: for each view in ``schemas.features.GOLD_TABLES`` an impression gets the row of its
entity keys with the latest ``event_timestamp`` <= the impression's time (``impression_time_ms``) and >= that
time minus the view's TTL (``feature_repo.features``; both ends included, as Feast's offline store does) --
never a value computed after the impression. Columns are ``<view>__<feature>`` (Feast's full feature names);
no row -> null. Gold days quarantined for a view are not used.

Downsampling is deterministic: a negative is kept when a hash of its ``impression_id`` and ``seed`` falls
under ``negative_rate``, so a re-run keeps the same rows. ``sample_rate`` is 1.0 for positives and
``negative_rate`` for kept negatives; calibration undoes it with ``p / (p + (1 - p) / sample_rate)``.

The real-time views (``schemas.features.REALTIME_TABLES``) are joined the same way from their offline log
(``<lake>/realtime/<view>``, landed by ``batch_jobs.realtime_log``), with one difference: only rows stamped
strictly before the impression count. A real-time row stamped at the impression's own time already counts
that impression (the worker wrote it after the ad was shown), which serving could not have seen.

Served impressions are joined by *availability* instead: the prediction log says when serving read the store
(``read_ms``), each real-time row when it was written (``written_ms``, its log record's Kafka timestamp) and
each gold row when it was loaded (``feature_repo.loads``). Such an impression gets, per view, the row written
last before the read, if its ``event_timestamp`` is within the TTL before the impression -- what the online
store held, under the rule serving applies. A gold day loaded an hour after midnight is not seen by the
impressions of that hour; a real-time row written during a backlog is not seen by impressions read before it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta

from batch_jobs.days import day_bounds, days
from batch_jobs.gold import gold_path
from batch_jobs.quality import DistributionCheck, guard, quarantine_state, quarantined_days
from batch_jobs.realtime_log import WRITTEN
from batch_jobs.silver import silver_path
from feature_repo import loads
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.features import GOLD_TABLES, REALTIME_TABLES, FeatureRow, TrainingRow

SILVER_TABLE = "silver/labeled_impressions"
TABLE = "training/training_set"
HASH_SPACE = 1 << 53  # the downsampling hash, reduced to a uniform integer in [0, 2^53)
EVENT_TIME = "__event_time"
READ = "__read_ms"  # when serving read the online store for the impression (null: never served by a ranker)
READ_AD, READ_ADVERTISER = "__ad_read_ms", "__advertiser_read_ms"  # when its cache read the shown ad's rows
AVAILABLE = "available_ms"  # when a feature row became readable online (gold: its load; real-time: its write)
CLICKED_SHARE = "clicked_share"  # ``clicked`` as 0/1, for the label-rate check


def training_path(settings: Settings) -> str:
    return str(settings.lake_dir / "training" / "training_set")


def feature_columns(table: type[FeatureRow]) -> list[str]:
    """The training-set columns of one view: ``<view>__<feature>``."""
    return [f"{table.VIEW}__{n}" for n in table.feature_names()]


def view_ttl(table: type[FeatureRow]) -> timedelta:
    """The TTL of the view's Feast definition (the same number the online store serves with)."""
    from feature_repo.features import VIEWS

    return VIEWS[table.VIEW].ttl


def _delta_or_none(spark, path: str):
    from delta.tables import DeltaTable

    return spark.read.format("delta").load(path) if DeltaTable.isDeltaTable(spark, path) else None


def keep_column(negative_rate: float, seed: int):
    """True for a row the downsampling keeps: every positive; a negative when hash(impression_id, seed) < rate."""
    from pyspark.sql import functions as F

    u = F.pmod(F.xxhash64(F.col("impression_id"), F.lit(seed).cast("long")), F.lit(HASH_SPACE)) / float(HASH_SPACE)
    return F.col("clicked") | (u < F.lit(float(negative_rate)))


def silver_days(spark, settings: Settings, start: date, end: date) -> list[str]:
    """The days in [start, end] that silver has rows for and has not quarantined (skipped ones are printed)."""
    from pyspark.sql import functions as F

    silver = _delta_or_none(spark, silver_path(settings))
    if silver is None:
        print(f"training_set: no silver table at {silver_path(settings)}")
        return []
    wanted = [d.isoformat() for d in days(start, end)]
    present = {r["ds"] for r in silver.where(F.col("ds").isin(wanted)).select("ds").distinct().collect()}
    bad = quarantined_days(settings, SILVER_TABLE, spark)
    skipped = sorted(present & bad)
    if skipped:
        print(f"training_set: skipping quarantined silver days {', '.join(skipped)}")
    missing = sorted(set(wanted) - present)
    if missing:
        print(f"training_set: no silver rows for {', '.join(missing)}")
    return sorted(present - bad)


def source_path(settings: Settings, table: type[FeatureRow]) -> str:
    """Where a view's offline rows are: gold tables, or the real-time log."""
    from batch_jobs.realtime_log import realtime_path

    return realtime_path(settings, table) if table.REALTIME else gold_path(settings, table)


def read_column(table: type[FeatureRow]):
    """When serving read ``table``'s row for the impression: the cache's read of the shown ad's rows for the ad
    and advertiser views (the request's read where the cache's is unknown), the request's read otherwise."""
    from pyspark.sql import functions as F

    from feature_repo.online import AD_VIEWS, ADVERTISER_VIEWS

    if table.VIEW in AD_VIEWS:
        return F.coalesce(F.col(READ_AD), F.col(READ))
    if table.VIEW in ADVERTISER_VIEWS:
        return F.coalesce(F.col(READ_ADVERTISER), F.col(READ))
    return F.col(READ)


def as_of_join(frame, gold, table: type[FeatureRow], ttl: timedelta):
    """``frame`` (one row per impression_id, with ``EVENT_TIME`` and ``READ``) plus ``table``'s features:

    - a served impression (``READ`` set): the row of the same keys written last before the read (``gold``'s
      ``AVAILABLE`` column), if its ``event_timestamp`` is within the TTL before the impression -- the rule
      the online store served by;
    - otherwise: the row with the latest ``event_timestamp`` in [time - ttl, time] (real-time views: strictly
      before the time);

    else nulls."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    added = [c for c in (READ, READ_AD, READ_ADVERTISER) if c not in frame.columns]  # no read times: event time
    frame = frame.select("*", *[F.lit(None).cast("long").alias(c) for c in added])
    ts, ds = f"__{table.VIEW}_ts", f"__{table.VIEW}_ds"
    keys = {k: f"__{table.VIEW}_{k}" for k in table.ENTITIES}
    named = zip(table.feature_names(), feature_columns(table), strict=True)
    offset = f"__{table.VIEW}_offset"
    log_order = F.col("kafka_offset") if "kafka_offset" in gold.columns else F.lit(0).cast("long")
    avail = f"__{table.VIEW}_available"
    available = F.col(AVAILABLE) if AVAILABLE in gold.columns else F.lit(None).cast("long")
    right = gold.select(*[F.col(k).alias(v) for k, v in keys.items()],
                        F.col("event_timestamp").alias(ts), F.col("ds").alias(ds), log_order.alias(offset),
                        available.alias(avail),
                        *[F.col(n).alias(c) for n, c in named])
    t, read = F.col(EVENT_TIME), read_column(table)
    by_event_time = F.col(ts) < t if table.REALTIME else F.col(ts) <= t
    by_availability = F.col(avail).isNotNull() & (F.col(avail) < read)  # written before serving read
    cond = [F.col(k) == F.col(v) for k, v in keys.items()]
    cond += [F.col(ts) >= t - F.lit(ttl), (read.isNull() & by_event_time) | (read.isNotNull() & by_availability)]
    # Served: the last row written before the read (what the online store held). Otherwise the latest by
    # event time. Ties: the later timestamp, the later ds, then (real-time rows) the later record of the log.
    written = F.when(read.isNull(), F.lit(0)).otherwise(F.col(avail))
    latest = Window.partitionBy("impression_id").orderBy(written.desc_nulls_last(), F.col(ts).desc_nulls_last(),
                                                         F.col(ds).desc_nulls_last(), F.col(offset).desc_nulls_last())
    joined = frame.join(right, on=cond, how="left").withColumn("__rank", F.row_number().over(latest))
    return joined.where(F.col("__rank") == 1).drop("__rank", ts, ds, offset, avail, *keys.values(), *added)


def build(spark, settings: Settings, start: date, end: date, negative_rate: float = 0.1, seed: int = 7):
    """The training rows of the silver days in [start, end] (not written): TrainingRow's columns, then the
    ``<view>__<feature>`` columns of every gold view, then ``ds``."""
    from pyspark.sql import functions as F

    from schemas.spark import spark_schema

    if not 0.0 < negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
    kept_days = silver_days(spark, settings, start, end)
    base_cols = [*TrainingRow.model_fields]
    if not kept_days:
        from pyspark.sql import types as T

        schema = spark_schema(TrainingRow)
        for table in GOLD_TABLES + REALTIME_TABLES:
            for name, col in zip(table.feature_names(), feature_columns(table), strict=True):
                schema = schema.add(col, spark_schema(table)[name].dataType, True)
        return spark.createDataFrame([], schema.add("ds", T.StringType()))
    print(f"training_set: silver days {', '.join(kept_days)}; negatives kept at {negative_rate} (seed {seed})")
    silver = spark.read.format("delta").load(silver_path(settings)).where(F.col("ds").isin(kept_days))
    frame = (silver.where(keep_column(negative_rate, seed))
             .withColumn("sample_rate", F.when(F.col("clicked"), F.lit(1.0)).otherwise(F.lit(float(negative_rate))))
             .withColumn(EVENT_TIME, F.timestamp_millis(F.col("impression_time_ms")))
             .select(*base_cols, "ds", EVENT_TIME))
    frame = with_read_time(spark, settings, frame, date.fromisoformat(kept_days[0]),
                           date.fromisoformat(kept_days[-1]))
    # Gold rows that can matter: up to the end of the last day, no older than the TTL before the first.
    first_ms, _ = day_bounds(date.fromisoformat(kept_days[0]))
    _, last_ms = day_bounds(date.fromisoformat(kept_days[-1]))
    out_cols = list(base_cols)
    quarantined = quarantine_state(settings, spark)  # one read for every view
    for table in GOLD_TABLES + REALTIME_TABLES:
        ttl = view_ttl(table)
        cols = feature_columns(table)
        out_cols += cols
        gold = _delta_or_none(spark, source_path(settings, table))
        if gold is None:
            print(f"training_set: {table.VIEW}: no offline rows at {source_path(settings, table)}; features null")
            frame = frame.select("*", *[F.lit(None).cast(spark_schema(table)[n].dataType).alias(c)
                                        for n, c in zip(table.feature_names(), cols, strict=True)])
            continue
        bad = quarantined.get(f"gold/{table.VIEW}", set())
        if bad:
            print(f"training_set: {table.VIEW}: skipping quarantined gold days {', '.join(sorted(bad))}")
            gold = gold.where(~F.col("ds").isin(sorted(bad)))
        lo = F.timestamp_millis(F.lit(first_ms)) - F.lit(ttl)
        gold = gold.where((F.col("event_timestamp") >= lo) & (F.col("event_timestamp") <= F.timestamp_millis(
            F.lit(last_ms))))
        gold = (gold.withColumnRenamed(WRITTEN, AVAILABLE) if table.REALTIME
                else loads.available(spark, settings, table.VIEW, gold))
        print(f"training_set: {table.VIEW}: as-of join on {', '.join(table.ENTITIES)} (ttl {ttl})")
        frame = as_of_join(frame, gold, table, ttl)
    return frame.select(*out_cols, "ds")


def with_read_time(spark, settings: Settings, frame, start: date, end: date):
    """``frame`` plus ``READ``, ``READ_AD`` and ``READ_ADVERTISER``: when serving read the features of each
    impression, from its first replayable prediction-log record (``read_ms``; for the cached ad-side rows, the
    later of their read and the cache's last check that found them current, ``ad_checked_ms``); null for an
    impression no ranker logged, or a record from before serving logged the read."""
    from pyspark.sql import functions as F

    from batch_jobs.replay_set import logged_rows

    logged = logged_rows(spark, settings, start, end)
    if logged is None:
        return frame  # no prediction log: as_of_join takes the missing read times as null (event time)

    def known(name: str):
        return F.when(F.col(name) >= 0, F.col(name))

    # The cache's rows are the store's as of its last check (``ad_checked_ms``), or their own read if later.
    checked = known("ad_checked_ms")
    reads = logged.where(F.col("read_ms") >= 0).select(
        "impression_id", known("read_ms").alias(READ),
        F.greatest(known("ad_read_ms"), checked).alias(READ_AD),
        F.greatest(known("advertiser_read_ms"), checked).alias(READ_ADVERTISER))
    return frame.join(reads, on="impression_id", how="left")


def replace_days(frame, path: str, days: list[str]) -> dict[str, tuple[int, int]]:
    """Replace the ``ds`` partitions ``days`` of the Delta table at ``path`` with ``frame`` (a day ``frame``
    lacks is emptied); returns ``{ds: (rows, positives)}`` of what was written."""
    from pyspark.sql import functions as F

    in_list = ", ".join(f"'{d}'" for d in days)
    (frame.write.format("delta").mode("overwrite").partitionBy("ds").option("mergeSchema", "true")
     .option("replaceWhere", f"ds IN ({in_list})").save(path))
    return {r["ds"]: (r["n"], r["p"]) for r in
            frame.groupBy("ds").agg(F.count("*").alias("n"), F.sum(F.col("clicked").cast("long")).alias("p")).collect()}


def run(start: date, end: date, settings: Settings | None = None, negative_rate: float = 0.1,
        seed: int = 7) -> dict:
    """Build and replace the ``ds`` partitions of the silver days in [start, end]; gate each written day.
    Returns ``{"rows": n, "positives": n, "days": [ds, ...], "warnings": {ds: [non-critical failures]}}``."""
    from pyspark.sql import functions as F

    settings = settings or get_settings()
    spark = spark_session("training_set", settings)
    frame = build(spark, settings, start, end, negative_rate, seed).cache()
    try:
        written = sorted(r["ds"] for r in frame.select("ds").distinct().collect())
        if not written:
            print("training_set: nothing to write")
            return {"rows": 0, "positives": 0, "days": [], "warnings": {}}
        path = training_path(settings)
        counts = replace_days(frame, path, written)
    finally:
        frame.unpersist()
    table = spark.read.format("delta").load(path)
    warnings: dict[str, list[str]] = {}
    for ds in written:
        n, p = counts[ds]
        print(f"training_set: {ds}: wrote {n:,} rows ({p:,} positives); checking quality")
        # GX cannot average a boolean column on Spark: the label rate is checked on a 0/1 copy of ``clicked``.
        day = table.where(F.col("ds") == F.lit(ds)).withColumn(CLICKED_SHARE, F.col("clicked").cast("double"))
        result = guard(day, TrainingRow, TABLE, ds, settings, checks=quality_checks(negative_rate))
        warnings[ds] = list(result.warnings)
        for warning in result.warnings:
            print(f"training_set: {ds}: warning: {warning}")
    return {"rows": sum(n for n, _ in counts.values()), "positives": sum(p for _, p in counts.values()),
            "days": written, "warnings": warnings}


def quality_checks(negative_rate: float) -> list[DistributionCheck]:
    """The training set's checks beyond TrainingRow's schema: the label rate after downsampling (positives /
    (positives + rate * negatives)), the sample rates, and each gold view's coverage (null share of its first
    feature). Only the sample-rate range is critical."""
    return [
        DistributionCheck(CLICKED_SHARE, "mean_between", min=0.001, max=0.9),
        DistributionCheck("sample_rate", "between", min=negative_rate, max=1.0, critical=True),
        *[DistributionCheck(feature_columns(t)[0], "null_share_at_most", max=0.5) for t in GOLD_TABLES],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.training_set", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=date.fromisoformat, required=True, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--end", type=date.fromisoformat, required=True, help="last UTC day (included), YYYY-MM-DD")
    p.add_argument("--negative-rate", type=float, default=0.1, help="share of negatives kept (default 0.1)")
    p.add_argument("--seed", type=int, default=7, help="seed of the downsampling hash (default 7)")
    a = p.parse_args(argv)
    if a.end < a.start:
        p.error("--end is before --start")
    out = run(a.start, a.end, negative_rate=a.negative_rate, seed=a.seed)
    print(f"training_set: {out['rows']:,} rows, {out['positives']:,} positives, days {', '.join(out['days'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
