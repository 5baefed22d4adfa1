"""Silver: matured labels computed from bronze by the label joiner's rules, joined to the impression's context.

``python -m batch_jobs.silver --ds 2026-11-02`` joins the impressions of that UTC day (from the bronze
tables, the one raw landing) with their clicks and conversions and replaces that day's partition of the
Delta table ``<lake>/silver/labeled_impressions`` (``schemas.events.LabeledImpression``; idempotent per
day). Run it once the conversion window (plus the conversions' lateness) after the day has closed, and
after bronze has landed that far.

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
from datetime import date

from batch_jobs.bronze import campaigns_as_of, read_bronze
from batch_jobs.days import day_bounds
from batch_jobs.quality import DistributionCheck, QualityError, guard, is_quarantined
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from label_joiner.rules import FIRST_ORDER, Rules
from schemas.events import Click, Conversion, Impression, LabeledImpression

ID_FIELD = {Impression: "impression_id", Click: "click_id", Conversion: "conversion_id"}


def read_events(spark, settings: Settings, cls, rules: Rules):
    """Valid, plausible events of ``cls`` from bronze, with ``arrival`` (the record's Kafka timestamp, ms)."""
    from pyspark.sql import functions as F

    valid = read_bronze(spark, settings, cls).withColumnRenamed("arrival_ms", "arrival")
    return valid.where(rules.plausible(F.col("event_time_ms"), F.col("arrival")))


def first(frame, key: str = "impression_id"):
    """The row that counts per ``key``: the earliest event time, then the smallest id (columns t and id)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(key).orderBy(*FIRST_ORDER)
    return frame.withColumn("rank", F.row_number().over(order)).where("rank = 1").drop("rank")


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
    imp_t = F.col("impression_time_ms")
    clicks = first(read_events(spark, settings, Click, rules)
                   .select("impression_id", F.col("click_id").alias("id"), F.col("event_time_ms").alias("t"),
                           "arrival")
                   .join(imps.select("impression_id", "impression_time_ms"), "impression_id")
                   .where(rules.click_in_window(imp_t, F.col("t"))
                          & rules.click_arrived_in_time(imp_t, F.col("arrival")))
                   .dropDuplicates(["id"])  # after the arrival rule: a late copy never hides a timely one
                   ).select("impression_id", F.col("id").alias("click_id"), F.col("t").alias("click_time_ms"))
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
    labels = (imps.join(clicks, "impression_id", "left").join(convs, "impression_id", "left")
              .join(F.broadcast(campaigns_as_of(spark, settings, end_ms).select("campaign_id", "category_id")),
                    "campaign_id", "left")
              .withColumn("clicked", F.col("click_time_ms").isNotNull())
              .withColumn("converted", F.col("conversion_time_ms").isNotNull())
              .withColumn("conversion_value", F.coalesce("conversion_value", F.lit(0.0))))
    return labels.select(*LabeledImpression.field_names())


def silver_path(settings: Settings) -> str:
    return str(settings.lake_dir / "silver" / "labeled_impressions")


LABEL_CHECKS = (
    DistributionCheck("clicked", "mean_between", 0.001, 0.3),  # the click rate: a warning, not a block
    DistributionCheck("conversion_value", "between", 0.0, 100_000.0, critical=True),
)


def run(ds: date, settings: Settings | None = None, quality: bool = True) -> str:
    """Compute one day and replace its partition of the Delta table; return the table path. Refuses a day
    whose bronze impressions are quarantined; with ``quality``, checks the partition it wrote."""
    from pyspark.sql import functions as F

    settings = settings or get_settings()
    if is_quarantined(settings, "bronze/impressions", ds.isoformat()):
        raise QualityError(f"silver: bronze/impressions {ds} is quarantined (see "
                           f"{settings.lake_dir / '_quarantine' / 'bronze' / 'impressions'}): not built")
    spark = spark_session("silver", settings)
    start_ms, end_ms = day_bounds(ds)
    path = silver_path(settings)
    labels = labeled_impressions(spark, settings, start_ms, end_ms).withColumn("ds", F.lit(ds.isoformat()))
    (labels.write.format("delta").mode("overwrite").partitionBy("ds")
     .option("replaceWhere", f"ds = '{ds.isoformat()}'").save(path))
    if quality:
        written = spark.read.format("delta").load(path).where(F.col("ds") == ds.isoformat())
        result = guard(written, LabeledImpression, "silver/labeled_impressions", ds.isoformat(), settings,
                       LABEL_CHECKS)
        print(f"silver: quality {ds}: passed ({len(result.warnings)} warnings), report {result.report_path}")
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
