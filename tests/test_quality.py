"""Data-quality suites derived from the schemas catch bad partitions, quarantine them and write an HTML report
(real Spark, real great-expectations)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from batch_jobs import quality
from batch_jobs.quality import DistributionCheck, QualityError
from infra.settings import get_settings
from infra.spark_session import spark_session
from schemas.events import Impression
from schemas.spark import spark_schema

TABLE = "bronze/impressions"
ROWS = 300


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return get_settings().model_copy(update={"var_dir": tmp_path_factory.mktemp("quality")})


@pytest.fixture(scope="module")
def spark(settings):
    return spark_session("quality-test", settings)


def impressions(n: int = ROWS, seed: int = 3) -> list[dict]:
    """Valid impression rows (each passes ``Impression`` validation)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = Impression(impression_id=f"imp-{i}", request_id=f"req-{i // 3}", user_id=rng.randrange(1000),
                         ad_id=rng.randrange(200), advertiser_id=rng.randrange(20), campaign_id=rng.randrange(50),
                         placement=rng.choice(["feed", "sidebar"]), position=rng.randrange(10),
                         device=rng.choice(["ios", "android", "web"]), bid=rng.uniform(0.1, 3.0),
                         event_time_ms=1_793_577_600_000 + i * 1000, model_version="m1",
                         served_pctr=rng.uniform(0.0, 0.06), served_pcvr=rng.uniform(0.0, 0.04),
                         feature_ref=f"req-{i // 3}/{i}")
        rows.append(row.model_dump() | {"ds": "2026-11-02", "kafka_offset": i})
    return rows


def frame_of(spark, rows: list[dict]):
    """A Spark frame with the Impression schema (all nullable, so a test can break it) plus extra columns."""
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField(f.name, f.dataType, True) for f in spark_schema(Impression).fields]
                          + [T.StructField("ds", T.StringType()), T.StructField("kafka_offset", T.LongType())])
    return spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema)


def test_a_clean_partition_passes_with_an_html_report(spark, settings):
    result = quality.guard(frame_of(spark, impressions()), Impression, TABLE, "2026-11-02", settings)
    assert result.passed and result.failures == [] and result.warnings == [], result.failures
    assert result.report_path.is_file() and result.report_path.suffix == ".html"
    assert "<html" in result.report_path.read_text().lower()
    assert not quality.is_quarantined(settings, TABLE, "2026-11-02")


def test_a_broken_partition_is_quarantined_until_released(spark, settings):
    rows = impressions()
    rows[5]["served_pctr"] = 1.5
    rows[17]["user_id"] = None
    ds = "2026-11-03"
    with pytest.raises(QualityError) as err:
        quality.guard(frame_of(spark, rows), Impression, TABLE, ds, settings)
    message = str(err.value)
    assert "served_pctr" in message and "user_id" in message and TABLE in message and ds in message
    assert quality.is_quarantined(settings, TABLE, ds)
    assert ds in quality.quarantined_days(settings, TABLE)
    report = message.split("report: ", 1)[1].splitlines()[0]
    assert report.endswith(".html") and Path(report).is_file()
    quality.release(settings, TABLE, ds)
    assert not quality.is_quarantined(settings, TABLE, ds)
    assert ds not in quality.quarantined_days(settings, TABLE)


def test_a_missing_column_fails(spark, settings):
    result = quality.check_partition(frame_of(spark, impressions(50)).drop("bid"), Impression, TABLE,
                                     "2026-11-04", settings)
    assert not result.passed
    assert len(result.failures) == 1 and result.failures[0].startswith("bid: expect_column_to_exist")


def test_expectations_come_from_the_schema():
    found = [e for e in quality.expectations_for(Impression)
             if type(e).__name__ == "ExpectColumnValuesToBeBetween" and e.column == "position"]
    assert len(found) == 1
    assert (found[0].min_value, found[0].max_value) == (0, 100)
    assert {e.severity for e in quality.expectations_for(Impression)} == {"critical"}


def test_distribution_checks_warn_or_block(spark, settings):
    frame = frame_of(spark, impressions())
    soft = DistributionCheck("served_pctr", "mean_between", min=0.2, max=0.5)
    result = quality.check_partition(frame, Impression, TABLE, "2026-11-05", settings, [soft])
    assert result.passed
    assert len(result.warnings) == 1 and "served_pctr" in result.warnings[0] and "mean" in result.warnings[0]
    hard = DistributionCheck("served_pctr", "mean_between", min=0.2, max=0.5, critical=True)
    fresh = DistributionCheck("event_time_ms", "max_at_least", min=1_793_577_600_000, critical=True)
    result = quality.check_partition(frame, Impression, TABLE, "2026-11-05", settings, [hard, fresh])
    assert not result.passed and result.warnings == []
    assert len(result.failures) == 1 and "served_pctr" in result.failures[0]


def test_the_command_validates_a_day_of_a_delta_table(spark, settings, monkeypatch, capsys):
    rows = impressions(100)
    for row in rows[50:]:
        row["ds"], row["position"] = "2026-11-07", 500  # a broken day next to a clean one
    frame_of(spark, rows).write.format("delta").partitionBy("ds").save(str(settings.lake_dir / TABLE))
    monkeypatch.setenv("ADS_VAR_DIR", str(settings.var_dir))
    get_settings.cache_clear()
    try:
        assert quality.main(["--table", TABLE, "--ds", "2026-11-07"]) == 1
        assert "position" in capsys.readouterr().err
        assert quality.quarantined_days(settings, TABLE) == {"2026-11-07"}
    finally:
        get_settings.cache_clear()
    assert quality.model_for("gold/user_features").VIEW == "user_features"
