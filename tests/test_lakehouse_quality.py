"""Write-audit-publish: a data-quality failure blocks the day downstream and reports, and the raw data stays. A
planted conversion worth a million lands in bronze (it is valid there); silver's critical range check on
``conversion_value`` fails on the frame it was about to write, so the day is quarantined with an HTML report
and never published. A quarantined bronze day of clicks blocks silver too (its impressions would come out as
negatives), and the click-rate check (a boolean column's mean) gives a verdict, not an error."""

from __future__ import annotations

import orjson
import pytest
from delta.tables import DeltaTable

from batch_jobs import bronze, silver
from batch_jobs.days import day_bounds
from batch_jobs.quality import (
    DistributionCheck,
    QualityError,
    guard,
    is_quarantined,
    quarantine,
    quarantined_days,
    release,
)
from infra.spark_session import spark_session
from schemas.codec import schema_headers
from schemas.events import Conversion, LabeledImpression
from streams.simulator.run import make_producer
from tests.test_bronze import CFG, publish


def test_quality_failure_quarantines_the_day_and_blocks_it(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={
        "var_dir": tmp_path, "windows": fresh_topics.windows.model_copy(update={"conversion_window_s": 3600.0})})
    gen = publish(settings, CFG)
    t = gen.truth
    row = t[t["clicked"] & ~t["converts"] & ~t["impression_malformed"] & ~t["click_malformed"]
            & ~t["impression_late"] & ~t["click_late"]].iloc[0]
    planted = Conversion(conversion_id="planted-v", click_id=row.impression_id.replace("-i", "-c", 1),
                         impression_id=row.impression_id, user_id=int(row.user_id), ad_id=int(row.ad_id),
                         event_time_ms=int(row.click_time_ms) + 60_000, value=1_000_000.0)
    producer = make_producer(settings)
    producer.send(settings.topics.conversions, key=planted.key().encode(), value=orjson.dumps(planted.model_dump()),
                  headers=schema_headers(Conversion), timestamp_ms=int(row.click_delivery_ms) + 60_000)
    producer.flush()
    producer.close()

    bronze.run(None, settings)  # valid in bronze: a value has no upper bound in the schema
    ds = CFG.start.date()
    with pytest.raises(QualityError) as failed:
        silver.run(ds, settings)
    message = str(failed.value)
    assert "conversion_value" in message and "report:" in message
    report = message.split("report: ")[1].split("\n")[0]
    assert report.endswith(".html") and open(report).read().count("conversion_value") > 0
    assert is_quarantined(settings, "silver/labeled_impressions", ds.isoformat())
    assert ds.isoformat() in quarantined_days(settings, "silver/labeled_impressions")
    spark = spark_session("test", settings)
    assert not DeltaTable.isDeltaTable(spark, silver.silver_path(settings))  # nothing published
    raw = spark.read.format("delta").load(bronze.table_path(settings, bronze.BY_MODEL[Conversion]))
    assert raw.where("conversion_id = 'planted-v'").count() == 1  # the raw record stays in bronze

    # Released, the day passes and is published; the click rate was checked (a verdict, not an error).
    release(settings, "silver/labeled_impressions", ds.isoformat())
    result = guard(silver.labeled_impressions(spark, settings, *day_bounds(ds)).where("conversion_value < 1e6"),
                   LabeledImpression, "silver/labeled_impressions", ds.isoformat(), settings,
                   [DistributionCheck("clicked", "mean_between", 0.5, 0.9)])
    assert any("clicked__as_number" in w and "observed" in w for w in result.warnings), result.warnings
    assert not any("error" in w for w in result.warnings), result.warnings

    # A quarantined bronze day of clicks: silver refuses the day rather than label its clicks as negatives.
    quarantine(settings, "bronze/clicks", ds.isoformat(), ["test"])
    with pytest.raises(QualityError, match="bronze/clicks"):
        silver.run(ds, settings)
