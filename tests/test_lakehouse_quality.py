"""A data-quality failure blocks the day downstream, reports, and keeps the data: a planted conversion worth
a million lands in bronze (it is valid there), silver's critical range check on ``conversion_value`` fails,
the day is quarantined with an HTML report, and its rows stay in the table."""

from __future__ import annotations

import orjson
import pytest

from batch_jobs import bronze, silver
from batch_jobs.quality import QualityError, is_quarantined, quarantined_days
from infra.spark_session import spark_session
from schemas.codec import schema_headers
from schemas.events import Conversion
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
    kept = spark_session("test", settings).read.format("delta").load(silver.silver_path(settings))
    assert kept.where(f"ds = '{ds.isoformat()}' AND conversion_value = 1000000.0").count() == 1
