"""The label joiner's batch twin: matured labels from the raw event topics, by the same rules.

``python -m batch_jobs.matured_labels --ds 2026-11-02`` joins the impressions of that UTC day with their
clicks and conversions and replaces that day's partition of the Delta table
``<lake>/silver/matured_labels`` (idempotent per day). Run it once the conversion window (plus the
conversions' lateness) after the day has closed.

Every decision is the stream's, from ``label_joiner.rules`` (one definition, applied here to Spark
columns): implausible event times are dropped; an event counts only if its Kafka record time (its arrival)
is within the lateness of its window's end; among several valid clicks (or conversions) the earliest
event time, then the smallest id, wins; a conversion counts only for the attributed click. Undecodable
events are left out (the stream dead-letters them); duplicates count once.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta

from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from label_joiner.rules import FIRST_ORDER, Rules
from schemas.events import Click, Conversion, Impression, MaturedLabel
from schemas.spark import spark_schema

ID_FIELD = {Impression: "impression_id", Click: "click_id", Conversion: "conversion_id"}


def read_events(spark, settings: Settings, topic: str, cls, rules: Rules):
    """Valid, plausible events of ``cls`` from a Kafka topic, with ``arrival`` (the record's timestamp, ms)."""
    from pyspark.sql import functions as F

    raw = (spark.read.format("kafka").option("kafka.bootstrap.servers", settings.kafka.bootstrap_servers)
           .option("subscribe", topic).option("startingOffsets", "earliest").option("endingOffsets", "latest")
           .option("kafka.isolation.level", "read_committed").load())
    parsed = raw.select(F.from_json(F.col("value").cast("string"), spark_schema(cls), {"mode": "PERMISSIVE"})
                        .alias("e"), F.unix_millis("timestamp").alias("arrival")).select("e.*", "arrival")
    required = [name for name, info in cls.model_fields.items() if info.is_required()]
    valid = parsed.where(F.expr(" AND ".join(f"{c} IS NOT NULL" for c in required)))
    valid = valid.where((F.col("event_time_ms") >= 0) & rules.plausible(F.col("event_time_ms"), F.col("arrival")))
    return valid


def first(frame, key: str = "impression_id"):
    """The row that counts per ``key``: the earliest event time, then the smallest id (columns t and id)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(key).orderBy(*FIRST_ORDER)
    return frame.withColumn("rank", F.row_number().over(order)).where("rank = 1").drop("rank")


def matured_labels(spark, settings: Settings, start_ms: int, end_ms: int):
    """Matured labels of the impressions with ``start_ms <= event time < end_ms``."""
    from pyspark.sql import functions as F

    t, rules = settings.topics, Rules.from_settings(settings.windows)
    imps = (read_events(spark, settings, t.impressions, Impression, rules)
            .where((F.col("event_time_ms") >= start_ms) & (F.col("event_time_ms") < end_ms))
            .where(rules.impression_arrived_in_time(F.col("event_time_ms"), F.col("arrival")))
            .dropDuplicates(["impression_id"])
            .select("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id",
                    F.col("event_time_ms").alias("impression_time_ms")))
    imp_t = F.col("impression_time_ms")
    clicks = first(read_events(spark, settings, t.clicks, Click, rules)
                   .select("impression_id", F.col("click_id").alias("id"), F.col("event_time_ms").alias("t"),
                           "arrival")
                   .dropDuplicates(["id"])
                   .join(imps.select("impression_id", "impression_time_ms"), "impression_id")
                   .where(rules.click_in_window(imp_t, F.col("t"))
                          & rules.click_arrived_in_time(imp_t, F.col("arrival")))
                   ).select("impression_id", F.col("id").alias("click_id"), F.col("t").alias("click_time_ms"))
    click_t = F.col("click_time_ms")
    convs = first(read_events(spark, settings, t.conversions, Conversion, rules)
                  .select("impression_id", "click_id", F.col("conversion_id").alias("id"),
                          F.col("event_time_ms").alias("t"), "value", "arrival")
                  .dropDuplicates(["id"])
                  .join(clicks, ["impression_id", "click_id"])
                  .where(rules.conversion_in_window(click_t, F.col("t"))
                         & rules.conversion_arrived_in_time(click_t, F.col("arrival")))
                  ).select("impression_id", F.col("t").alias("conversion_time_ms"),
                           F.col("value").alias("conversion_value"))
    labels = (imps.join(clicks, "impression_id", "left").join(convs, "impression_id", "left")
              .withColumn("clicked", F.col("click_time_ms").isNotNull())
              .withColumn("converted", F.col("conversion_time_ms").isNotNull())
              .withColumn("conversion_value", F.coalesce("conversion_value", F.lit(0.0))))
    return labels.select(*MaturedLabel.field_names())


def day_bounds(ds: date) -> tuple[int, int]:
    start = datetime(ds.year, ds.month, ds.day, tzinfo=UTC)
    return int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)


def run(ds: date, settings: Settings | None = None) -> str:
    """Compute one day and replace its partition of the Delta table; return the table path."""
    from pyspark.sql import functions as F

    settings = settings or get_settings()
    spark = spark_session("matured_labels", settings)
    start_ms, end_ms = day_bounds(ds)
    path = str(settings.lake_dir / "silver" / "matured_labels")
    labels = matured_labels(spark, settings, start_ms, end_ms).withColumn("ds", F.lit(ds.isoformat()))
    (labels.write.format("delta").mode("overwrite").partitionBy("ds")
     .option("replaceWhere", f"ds = '{ds.isoformat()}'").save(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.matured_labels", description=__doc__)
    p.add_argument("--ds", type=date.fromisoformat, required=True, help="UTC day, YYYY-MM-DD")
    a = p.parse_args(argv)
    path = run(a.ds)
    print(f"matured_labels: wrote {a.ds} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
