"""The label joiner's batch twin: matured labels from the raw event topics, with the same windows and rules.

``python -m batch_jobs.matured_labels --ds 2026-11-02`` joins the impressions of that UTC day with their
clicks (within the click window) and conversions (within the conversion window after the click) and
replaces that day's partition of the Delta table ``<lake>/silver/matured_labels`` (idempotent per day).
Run it once the conversion window after the day has closed. Undecodable events are left out (the stream
dead-letters them); duplicates count once; the earliest valid click and conversion win.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta

from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.events import Click, Conversion, Impression, MaturedLabel
from schemas.spark import spark_schema


def read_events(spark, settings: Settings, topic: str, cls):
    """Valid events of ``cls`` from a Kafka topic (a batch read of everything retained)."""
    from pyspark.sql import functions as F

    raw = (spark.read.format("kafka").option("kafka.bootstrap.servers", settings.kafka.bootstrap_servers)
           .option("subscribe", topic).option("startingOffsets", "earliest").option("endingOffsets", "latest")
           .load())
    parsed = raw.select(F.from_json(F.col("value").cast("string"), spark_schema(cls),
                                    {"mode": "PERMISSIVE"}).alias("e")).select("e.*")
    required = [name for name, info in cls.model_fields.items() if info.is_required()]
    valid = parsed.where(F.expr(" AND ".join(f"{c} IS NOT NULL" for c in required)))
    return valid.where(F.col("event_time_ms") >= 0).dropDuplicates([_id_field(cls)])


def _id_field(cls) -> str:
    return {Impression: "impression_id", Click: "click_id", Conversion: "conversion_id"}[cls]


def matured_labels(spark, settings: Settings, start_ms: int, end_ms: int):
    """Matured labels of the impressions with ``start_ms <= event time < end_ms``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t, w = settings.topics, settings.windows
    click_ms, conv_ms = int(w.click_window_s * 1000), int(w.conversion_window_s * 1000)
    imps = (read_events(spark, settings, t.impressions, Impression)
            .where((F.col("event_time_ms") >= start_ms) & (F.col("event_time_ms") < end_ms))
            .select("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id",
                    F.col("event_time_ms").alias("impression_time_ms")))
    first = Window.partitionBy("impression_id").orderBy("t", "id")
    clicks = (read_events(spark, settings, t.clicks, Click)
              .select("impression_id", F.col("click_id").alias("id"), F.col("event_time_ms").alias("t"))
              .join(imps.select("impression_id", "impression_time_ms"), "impression_id")
              .where((F.col("t") >= F.col("impression_time_ms"))
                     & (F.col("t") <= F.col("impression_time_ms") + click_ms))
              .withColumn("rank", F.row_number().over(first)).where("rank = 1")
              .select("impression_id", F.col("id").alias("click_id"), F.col("t").alias("click_time_ms")))
    convs = (read_events(spark, settings, t.conversions, Conversion)
             .select("impression_id", "click_id", F.col("conversion_id").alias("id"),
                     F.col("event_time_ms").alias("t"), "value")
             .join(clicks, ["impression_id", "click_id"])
             .where((F.col("t") >= F.col("click_time_ms")) & (F.col("t") <= F.col("click_time_ms") + conv_ms))
             .withColumn("rank", F.row_number().over(first)).where("rank = 1")
             .select("impression_id", F.col("t").alias("conversion_time_ms"),
                     F.col("value").alias("conversion_value")))
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
