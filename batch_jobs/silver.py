"""Silver: matured labels computed from bronze by the label joiner's rules, joined to the impression's context.

``python -m batch_jobs.silver --ds 2026-11-02`` joins the impressions of that UTC day (from the bronze tables, the
one raw landing) with their clicks, conversions and negative feedback and replaces that day's partition of the
Delta table ``<lake>/silver/labeled_impressions`` (``schemas.events.LabeledImpression``; idempotent per day). Run
it once the conversion window (plus the conversions' lateness) after the day has closed, and after bronze has
landed that far.

This is the streaming joiner's batch twin: every decision comes from ``label_joiner.rules`` (one
definition, applied here to Spark columns): implausible event times are dropped; an event counts only if
its Kafka record time (its arrival, kept by bronze) is within the lateness of its window's end; among
several valid clicks (or conversions) the earliest event time, then the smallest id, wins; a conversion
counts only for the attributed click. Undecodable events are bronze's dead letters; duplicates count once
(after the arrival rule, so a late copy never hides a copy that arrived in time). The impression's category
comes from the campaign catalog as it was at the day's end (a backfill sees the catalog of its day, not today's).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta

from batch_jobs.bronze import campaigns_as_of, read_bronze
from batch_jobs.days import day_bounds
from batch_jobs.quality import (
    DistributionCheck,
    QualityError,
    guard,
    previous_counts,
    quarantine_state,
    volume_check,
)
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from label_joiner.rules import FIRST_ORDER, Rules
from schemas.events import Click, Conversion, Impression, LabeledImpression, NegativeFeedback


def read_events(spark, settings: Settings, cls, rules: Rules):
    """Valid, plausible events of ``cls`` from bronze, with ``arrival`` (the record's Kafka timestamp, ms)."""
    from pyspark.sql import functions as F

    valid = (read_bronze(spark, settings, cls, missing_ok=cls is NegativeFeedback)
             .withColumnRenamed("arrival_ms", "arrival"))
    return valid.where(rules.plausible(F.col("event_time_ms"), F.col("arrival")))


def first(frame, key: str = "impression_id"):
    """The row that counts per ``key``: the earliest event time, then the smallest id (columns t and id)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(key).orderBy(*FIRST_ORDER)
    return frame.withColumn("rank", F.row_number().over(order)).where("rank = 1").drop("rank")


def first_after_impression(events, id_field: str, imps, in_window, arrived_in_time):
    """Per impression, the event (a click, or a hide or report) that counts: within its window after the impression
    and arrived in time, repeats once, the earliest (time, then id); columns impression_id, id, t."""
    from pyspark.sql import functions as F

    imp_t = F.col("impression_time_ms")
    return first(events.select("impression_id", F.col(id_field).alias("id"), F.col("event_time_ms").alias("t"),
                               "arrival")
                 .join(imps.select("impression_id", "impression_time_ms"), "impression_id")
                 .where(in_window(imp_t, F.col("t")) & arrived_in_time(imp_t, F.col("arrival")))
                 .dropDuplicates(["id"]))  # after the arrival rule: a late copy never hides a timely one


def labeled_impressions(spark, settings: Settings, start_ms: int, end_ms: int):
    """Matured labels and context of the impressions with ``start_ms <= event time < end_ms``."""
    from pyspark.sql import functions as F

    rules = Rules.from_settings(settings.windows)
    imps = (read_events(spark, settings, Impression, rules)
            .where((F.col("event_time_ms") >= start_ms) & (F.col("event_time_ms") < end_ms))
            .where(rules.impression_arrived_in_time(F.col("event_time_ms"), F.col("arrival")))
            .dropDuplicates(["impression_id"])
            .select("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "placement", "position",
                    "device", "bid", F.col("event_time_ms").alias("impression_time_ms")))
    clicks = first_after_impression(read_events(spark, settings, Click, rules), "click_id", imps, rules.click_in_window,
                                    rules.click_arrived_in_time
                                    ).select("impression_id", F.col("id").alias("click_id"),
                                             F.col("t").alias("click_time_ms"))
    click_t = F.col("click_time_ms")
    convs = first(read_events(spark, settings, Conversion, rules)
                  .select("impression_id", "click_id", F.col("conversion_id").alias("id"),
                          F.col("event_time_ms").alias("t"), "value", "arrival")
                  .join(clicks, ["impression_id", "click_id"])
                  .where(rules.conversion_in_window(click_t, F.col("t"))
                         & rules.conversion_arrived_in_time(click_t, F.col("arrival")))
                  .dropDuplicates(["id"])
                  ).select("impression_id", F.col("t").alias("conversion_time_ms"),
                           F.col("value").alias("conversion_value"))
    feedback = first_after_impression(read_events(spark, settings, NegativeFeedback, rules), "feedback_id", imps,
                                      rules.feedback_in_window, rules.feedback_arrived_in_time
                                      ).select("impression_id", F.lit(True).alias("negative_feedback"))
    labels = (imps.join(clicks, "impression_id", "left").join(convs, "impression_id", "left")
              .join(feedback, "impression_id", "left")
              .join(F.broadcast(campaigns_as_of(spark, settings, end_ms).select("campaign_id", "category_id")),
                    "campaign_id", "left")
              .withColumn("clicked", F.col("click_time_ms").isNotNull())
              .withColumn("converted", F.col("conversion_time_ms").isNotNull())
              .withColumn("conversion_value", F.coalesce("conversion_value", F.lit(0.0)))
              .withColumn("negative_feedback", F.coalesce("negative_feedback", F.lit(False))))
    return labels.select(*LabeledImpression.field_names())


def silver_path(settings: Settings) -> str:
    return str(settings.lake_dir / "silver" / "labeled_impressions")


def label_checks(settings: Settings, ds: date, previous: list[int]) -> list[DistributionCheck]:
    """Silver's checks beyond the schema: the click rate (a warning), conversion values in range, the day's
    volume against the previous days' (:func:`batch_jobs.quality.volume_check`, critical), and freshness: the
    day's newest impression within its last hour (a warning: an upstream that stopped mid-day gives a short day)."""
    checks = [DistributionCheck("clicked", "mean_between", 0.001, 0.3),
              DistributionCheck("conversion_value", "between", 0.0, 100_000.0, critical=True),
              DistributionCheck("impression_time_ms", "max_at_least", min=day_bounds(ds)[1] - 3_600_000)]
    if (volume := volume_check(previous)) is not None:
        checks.append(volume)
    return checks


def bronze_days_needed(settings: Settings, ds: date) -> list[str]:
    """The bronze arrival days whose records can label ``ds``'s impressions: the day itself and the days its
    conversion window and lateness reach into."""
    w = settings.windows
    reach_s = w.click_window_s + w.allowed_lateness_s + w.conversion_window_s + w.conversion_lateness_s
    return [(ds + timedelta(days=k)).isoformat() for k in range(int(reach_s // 86_400) + 2)]


def run(ds: date, settings: Settings | None = None, quality: bool = True) -> str:
    """Compute one day and, once it passed its checks (write-audit-publish: audited before it is written, so a
    failed day never reaches a reader), replace its partition of the Delta table; return the table path.
    Refuses a day that quarantined bronze days of impressions, clicks or conversions could have labeled
    (read_bronze leaves those days out: their impressions would come out as negatives)."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    settings = settings or get_settings()
    spark = spark_session("silver", settings)
    needed = set(bronze_days_needed(settings, ds))
    quarantined = quarantine_state(settings, spark)
    for table in ("bronze/impressions", "bronze/clicks", "bronze/conversions", "bronze/negative_feedback"):
        if bad := sorted(needed & quarantined.get(table, set())):
            raise QualityError(f"silver: {table} {', '.join(bad)} quarantined: {ds} not built (release the "
                               "days with batch_jobs.quality.release once fixed)")
    start_ms, end_ms = day_bounds(ds)
    path = silver_path(settings)
    labels = labeled_impressions(spark, settings, start_ms, end_ms).withColumn("ds", F.lit(ds.isoformat())).cache()
    try:
        if quality:
            table = spark.read.format("delta").load(path) if DeltaTable.isDeltaTable(spark, path) else None
            previous = previous_counts(table, ds.isoformat()) if table is not None else []
            result = guard(labels, LabeledImpression, "silver/labeled_impressions", ds.isoformat(), settings,
                           label_checks(settings, ds, previous))
            print(f"silver: quality {ds}: passed ({len(result.warnings)} warnings), report {result.report_path}")
        # mergeSchema: a table written before a column existed (negative_feedback) takes it; older days read null.
        (labels.write.format("delta").mode("overwrite").option("mergeSchema", "true").partitionBy("ds")
         .option("replaceWhere", f"ds = '{ds.isoformat()}'").save(path))
    finally:
        labels.unpersist()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.silver", description=__doc__)
    p.add_argument("--ds", type=date.fromisoformat, required=True, help="UTC day, YYYY-MM-DD")
    a = p.parse_args(argv)
    path = run(a.ds)
    print(f"silver: wrote {a.ds} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
