"""``make materialize`` (``feature_repo.materialize``): gold into Redis with our bulk loader, read back by Feast.

The same gold Delta table is loaded by ``feast materialize`` into one project and by ours into another: Feast's
``get_online_features`` returns the same values from both. A backfill of an older interval writes nothing over
newer rows (Feast's writer rule), a quarantined day is refused, and the load is recorded (issue 22)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from batch_jobs import quality
from batch_jobs.gold import gold_path
from feature_repo import loads
from feature_repo.cli import QuarantinedDays, feast
from feature_repo.materialize import materialize
from feature_repo.store import feature_store
from infra.spark_session import spark_session
from schemas.features import N_CATEGORIES, UserFeatures
from schemas.spark import spark_schema

USERS = 40


def gold_rows(stamp: datetime, users: range, offset: int) -> list[dict]:
    rows = []
    for user in users:
        values = {n: offset + user * 10 + i for i, n in enumerate(UserFeatures.feature_names())
                  if UserFeatures.model_fields[n].annotation is int}
        values |= {n: (offset // 1000 + user % 10) / 100 for n in UserFeatures.feature_names()
                   if UserFeatures.model_fields[n].annotation is float}
        row = UserFeatures(user_id=user, event_timestamp=stamp, **values,
                           user_category_profile=[1 / N_CATEGORIES] * N_CATEGORIES).model_dump()
        rows.append(row | {"ds": (stamp - timedelta(milliseconds=1)).date().isoformat()})
    return rows


def test_our_load_reads_back_in_feast_as_feast_materialize_writes_it(redis_settings, tmp_path):
    from pyspark.sql import types as T

    lake = redis_settings.model_copy(update={"var_dir": tmp_path})
    ours = lake.model_copy(update={"feast_project": f"o{uuid.uuid4().hex[:8]}"})
    theirs = lake.model_copy(update={"feast_project": f"f{uuid.uuid4().hex[:8]}"})
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    older, newer = day - timedelta(days=1), day  # two gold days; half the users have a row in the newer one
    rows = gold_rows(older, range(USERS), 0) + gold_rows(newer, range(USERS // 2), 1000)
    schema = spark_schema(UserFeatures).add("ds", T.StringType())
    spark = spark_session("materialize-test", lake)
    spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema) \
        .write.format("delta").partitionBy("ds").save(gold_path(lake, UserFeatures))
    start, end = (older - timedelta(hours=1)).isoformat(), (newer + timedelta(hours=1)).isoformat()

    assert feast(["apply"], theirs, online="redis").returncode == 0
    assert feast(["materialize", start, end, "--views", "user_features"], theirs, online="redis").returncode == 0
    # A quarantined gold day is refused before anything is written.
    ds = rows[0]["ds"]
    quality.quarantine(lake, "gold/user_features", ds, ["test"])
    with pytest.raises(QuarantinedDays, match=f"user_features: {ds}"):
        materialize(ours, loads.parse_materialize(["materialize", start, end, "--views", "user_features"]), spark)
    quality.release(lake, "gold/user_features", ds)
    before = int(datetime.now(UTC).timestamp() * 1000)
    written = materialize(ours, loads.parse_materialize(["materialize", start, end, "--views", "user_features"]),
                          spark)
    assert written == {"user_features": USERS}  # the latest row per user: one each

    features = [f"user_features:{n}" for n in UserFeatures.feature_names()]
    entity_rows = [{"user_id": u} for u in range(USERS)]
    got = {}
    for name, settings in (("ours", ours), ("feast", theirs)):
        store = feature_store(settings, "redis", apply=name == "ours")
        got[name] = store.get_online_features(features=features, entity_rows=entity_rows).to_dict()
    assert got["ours"] == got["feast"]
    latest = {r["user_id"]: r for r in rows if r["event_timestamp"] == newer} | \
        {r["user_id"]: r for r in rows if r["event_timestamp"] == older and r["user_id"] >= USERS // 2}
    assert got["ours"]["user_clicks_30d"] == [latest[u]["user_clicks_30d"] for u in range(USERS)]

    # Recorded after Feast's load of the same lake: both days' stamps, readable from after ``before`` on.
    recorded = spark.read.format("delta").load(loads.loads_path(lake)).where("view = 'user_features'") \
        .orderBy("loaded_ms").collect()
    assert len(recorded) == 2 and recorded[1]["loaded_ms"] >= before
    assert sorted(recorded[1]["stamps_ms"]) == [int(t.timestamp() * 1000) for t in (older, newer)]

    # A backfill of the older day alone: older or same-instant rows are skipped, nothing newer is overwritten.
    backfill = loads.parse_materialize(["materialize", start, (older + timedelta(hours=1)).isoformat(),
                                        "--views", "user_features"])
    assert materialize(ours, backfill, spark) == {"user_features": 0}
    store = feature_store(ours, "redis", apply=False)
    assert store.get_online_features(features=features, entity_rows=entity_rows).to_dict() == got["ours"]


def test_materialize_with_redis_down_fails_loudly(redis_settings, tmp_path):
    """Exit 1 with the reason, before Spark starts or anything is recorded."""
    import os
    import subprocess
    import sys

    settings = redis_settings.model_copy(update={
        "var_dir": tmp_path, "redis": redis_settings.redis.model_copy(update={"port": 1})})  # nothing listens
    end = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    done = subprocess.run([sys.executable, "-m", "feature_repo.materialize", "materialize-incremental", end],
                          env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Redis is not reachable at 127.0.0.1:1" in done.stderr
    assert not (tmp_path / "lake" / "feature_loads").exists()
