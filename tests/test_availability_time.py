"""Point-in-time by availability (real Spark + Delta): a served impression gets the feature rows that were
readable when serving read the store -- real-time rows by their write's Kafka timestamp, gold rows by their
load -- not every row stamped before the impression. Planted lags: a real-time row written a minute after
the read, a gold day loaded a second after it. An impression no ranker served keeps the event-time rule."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from batch_jobs import training_set
from batch_jobs.bronze import BY_MODEL, table_path
from batch_jobs.realtime_log import WRITTEN, realtime_path
from batch_jobs.silver import silver_path
from feature_repo import loads
from infra.settings import get_settings
from infra.spark_session import spark_session
from schemas.events import LabeledImpression, PredictionLog
from schemas.features import AdRealtime, UserFeatures, UserRealtime
from schemas.spark import spark_schema
from tests.test_training_set import DAY, at, epoch_ms, gold_row, silver_row, value_for, write

D = date(2026, 11, 10)
T = at(D + DAY, 12)  # both impressions' event time
READ = epoch_ms(T) + 5  # when serving read the store for the served one
AD_READ = READ - 2_000  # when the read path's cache had read the shown ad's rows
USER, AD = 1, 100


def realtime_row(t, impressions_1h: int, written_ms: int) -> dict:
    row = {n: value_for(n, UserRealtime.model_fields[n].annotation, None) for n in UserRealtime.feature_names()}
    row |= {"user_id": USER, "event_timestamp": t, "user_impressions_1h": impressions_1h}
    return UserRealtime(**row).model_dump() | {"ds": t.date().isoformat(), WRITTEN: written_ms,
                                               "kafka_partition": 0, "kafka_offset": impressions_1h}


def ad_realtime_row(t, impressions_1h: int, written_ms: int) -> dict:
    row = {n: value_for(n, AdRealtime.model_fields[n].annotation, None) for n in AdRealtime.feature_names()}
    row |= {"ad_id": AD, "event_timestamp": t, "ad_impressions_1h": impressions_1h}
    return AdRealtime(**row).model_dump() | {"ds": t.date().isoformat(), WRITTEN: written_ms,
                                             "kafka_partition": 0, "kafka_offset": impressions_1h}


def logged(impression_id: str, read_ms: int, checked_ms: int = -1) -> dict:
    """A bronze prediction-log row of a ranker (replayable), read at ``read_ms``."""
    record = PredictionLog(request_id="r", impression_id=impression_id, user_id=USER, ad_id=100, model_version="v1",
                           event_time_ms=epoch_ms(T), features={}, pctr=0.1, pcvr=0.1, placement="feed",
                           device="ios", feature_lists={"x": [1.0]}, read_ms=read_ms,
                           ad_read_ms=AD_READ, ad_checked_ms=checked_ms).model_dump()
    return record | {"arrival_ms": epoch_ms(T) + 10, "kafka_partition": 0, "kafka_offset": 0, "reject_reason": None,
                     "payload": "{}", "ds": T.date().isoformat()}


def write_extra(spark, rows: list[dict], schema, path: str) -> None:
    frame = spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema)
    frame.write.format("delta").partitionBy("ds").mode("append").save(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from pyspark.sql import types as T_

    settings = get_settings().model_copy(update={"var_dir": tmp_path_factory.mktemp("availability")})
    spark = spark_session("availability-test", settings)
    write(spark, [silver_row("served", T, user_id=USER, ad_id=AD, clicked=True),
                  silver_row("served-checked", T, user_id=USER, ad_id=AD, clicked=True),
                  silver_row("unserved", T, user_id=USER, ad_id=AD, clicked=True)], LabeledImpression,
          silver_path(settings))
    # Real-time rows of the user: one written before the read; one stamped before the impression but written
    # a minute after the read (the worker lagged).
    rt_schema = (spark_schema(UserRealtime).add("ds", T_.StringType()).add(WRITTEN, T_.LongType())
                 .add("kafka_partition", T_.IntegerType()).add("kafka_offset", T_.LongType()))
    write_extra(spark, [realtime_row(T - timedelta(minutes=30), 5, READ - 1_000),
                        realtime_row(T - timedelta(minutes=10), 7, READ + 60_000)],
                rt_schema, realtime_path(settings, UserRealtime))
    # The ad's real-time rows: one written before the cache read the ad, one after it (but before the request).
    ad_schema = (spark_schema(AdRealtime).add("ds", T_.StringType()).add(WRITTEN, T_.LongType())
                 .add("kafka_partition", T_.IntegerType()).add("kafka_offset", T_.LongType()))
    write_extra(spark, [ad_realtime_row(T - timedelta(minutes=30), 3, AD_READ - 1_000),
                        ad_realtime_row(T - timedelta(minutes=10), 9, AD_READ + 1_000)],
                ad_schema, realtime_path(settings, AdRealtime))
    # Gold: day D-1 (stamped 00:00 of D) loaded an hour before the read; day D (stamped 00:00 of D+1, before
    # the impression) loaded a second after it.
    write(spark, [gold_row(UserFeatures, D - DAY, {"user_id": USER}, user_ctr_7d=0.3),
                  gold_row(UserFeatures, D, {"user_id": USER}, user_ctr_7d=0.1)],
          UserFeatures, training_set.gold_path(settings, UserFeatures))
    for ds, loaded in ((D - DAY, READ - 3_600_000), (D, READ + 1_000)):
        stamp = epoch_ms(at(ds + DAY))
        loads.record(spark, settings, loads.Materialization(["user_features"], stamp - 1, stamp), loaded_ms=loaded)
    log_schema = (spark_schema(PredictionLog).add("arrival_ms", T_.LongType()).add("kafka_partition", T_.IntegerType())
                  .add("kafka_offset", T_.LongType()).add("reject_reason", T_.StringType())
                  .add("payload", T_.StringType()).add("ds", T_.StringType()))
    write_extra(spark, [logged("served", READ), logged("served-checked", READ, checked_ms=READ - 500)], log_schema,
                table_path(settings, BY_MODEL[PredictionLog]))
    frame = training_set.build(spark, settings, D + DAY, D + DAY, negative_rate=1.0)
    return {r["impression_id"]: r.asDict() for r in frame.collect()}


def test_a_served_impression_sees_only_rows_readable_at_its_read(built):
    served = built["served"]
    assert served["user_realtime__user_impressions_1h"] == 5  # the lagged row (7) was written after the read
    assert served["user_features__user_ctr_7d"] == 0.3  # day D was loaded after the read: D-1 was served
    assert served["ad_realtime__ad_impressions_1h"] == 3  # the ad's row as the cache read it, 2 s before


def test_cached_rows_count_as_of_the_caches_last_check(built):
    """A refresh that found the ad's row current after the second write: serving had that row."""
    assert built["served-checked"]["ad_realtime__ad_impressions_1h"] == 9


def test_an_unserved_impression_keeps_the_event_time_rule(built):
    unserved = built["unserved"]
    assert unserved["user_realtime__user_impressions_1h"] == 7
    assert unserved["user_features__user_ctr_7d"] == 0.1
    assert unserved["ad_realtime__ad_impressions_1h"] == 9


def test_a_load_claims_only_the_gold_days_present_when_it_ran(tmp_path):
    """The demo's materialize interval reaches two days ahead: a day computed after a load that covered its
    stamp was not loaded by it (the bug a demo run showed: every served impression got tomorrow's gold)."""
    settings = get_settings().model_copy(update={"var_dir": tmp_path})
    spark = spark_session("availability-test", settings)
    path = training_set.gold_path(settings, UserFeatures)
    stamp = epoch_ms(at(D + DAY))
    write(spark, [gold_row(UserFeatures, D - DAY, {"user_id": USER})], UserFeatures, path)

    def first_load() -> dict:
        gold = spark.read.format("delta").load(path)
        return {r["ds"]: r[loads.LOADED] for r in loads.available(spark, settings, "user_features", gold).collect()}

    loads.record(spark, settings, loads.Materialization(["user_features"], None, stamp - 1), loaded_ms=10)
    loads.record(spark, settings, loads.Materialization(["user_features"], stamp - 2 * 86_400_000, stamp + 86_400_000),
                 loaded_ms=20)  # covers day D's stamp, but day D is not computed yet
    write(spark, [gold_row(UserFeatures, D, {"user_id": USER})], UserFeatures, path)
    assert first_load() == {(D - DAY).isoformat(): 10, D.isoformat(): None}
    # An incremental load starts where the previous one ended (Feast's rule), so it does not reach back to day D.
    loads.record(spark, settings, loads.Materialization(["user_features"], None, stamp + 2 * 86_400_000),
                 loaded_ms=30)
    assert first_load()[D.isoformat()] is None
    for loaded in (40, 50):  # the next loads over day D find it: the first one counts
        loads.record(spark, settings, loads.Materialization(["user_features"], stamp - 1, stamp + 1),
                     loaded_ms=loaded)
    assert first_load() == {(D - DAY).isoformat(): 10, D.isoformat(): 40}
