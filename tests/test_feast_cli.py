"""The Feast repository works from the CLI, as users run it: ``feast apply`` registers every definition,
``feast materialize-incremental`` loads a gold Delta table into Redis, ``get_online_features`` reads it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from batch_jobs import quality
from batch_jobs.gold import gold_path
from feature_repo import loads
from feature_repo.cli import QuarantinedDays, feast
from feature_repo.store import feature_store
from infra.spark_session import spark_session
from schemas.features import N_CATEGORIES, UserFeatures
from schemas.spark import spark_schema


def test_feast_cli_apply_and_materialize_incremental(redis_settings, tmp_path):
    from pyspark.sql import types as T

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    stamp = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    rows = []
    for user in range(50):
        values = {n: user * 10 + i for i, n in enumerate(UserFeatures.feature_names())
                  if UserFeatures.model_fields[n].annotation is int}
        values |= {n: (user % 10) / 10 for n in UserFeatures.feature_names()
                   if UserFeatures.model_fields[n].annotation is float}
        row = UserFeatures(user_id=user, event_timestamp=stamp, **values,
                           user_category_profile=[1 / N_CATEGORIES] * N_CATEGORIES).model_dump()
        rows.append(row | {"ds": stamp.date().isoformat()})
    schema = spark_schema(UserFeatures).add("ds", T.StringType())
    spark = spark_session("feast-cli-test", settings)
    spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema) \
        .write.format("delta").partitionBy("ds").save(gold_path(settings, UserFeatures))

    assert feast(["apply"], settings, online="redis").returncode == 0
    end = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    # A gold day quarantined after it was written is refused before Feast runs (issue 21, item 1).
    quality.quarantine(settings, "gold/user_features", rows[0]["ds"], ["test"])
    with pytest.raises(QuarantinedDays, match=f"user_features: {rows[0]['ds']}"):
        feast(["materialize-incremental", end], settings, online="redis")
    quality.release(settings, "gold/user_features", rows[0]["ds"])
    before = int(datetime.now(UTC).timestamp() * 1000)
    assert feast(["materialize-incremental", end], settings, online="redis").returncode == 0
    # The load is recorded once the command succeeded: when the gold rows became readable (issue 19, item 9).
    gold = spark.read.format("delta").load(gold_path(settings, UserFeatures))
    available = {r[loads.LOADED] for r in loads.available(spark, settings, "user_features", gold).collect()}
    assert len(available) == 1 and available.pop() >= before

    store = feature_store(settings, "redis", apply=False)
    assert {v.name for v in store.list_feature_views()} >= {"user_features", "ad_features", "user_realtime"}
    got = store.get_online_features(features=["user_features:user_ctr_7d", "user_features:user_clicks_30d"],
                                    entity_rows=[{"user_id": r["user_id"]} for r in rows]).to_dict()
    assert got["user_ctr_7d"] == [r["user_ctr_7d"] for r in rows]
    assert got["user_clicks_30d"] == [r["user_clicks_30d"] for r in rows]


def test_materialize_with_redis_down_fails_loudly(redis_settings, tmp_path):
    """Issue 19, item 10: no silent SQLite fallback; the CLI exits 1 and says why, before Feast runs."""
    import os
    import subprocess
    import sys

    settings = redis_settings.model_copy(update={
        "var_dir": tmp_path, "redis": redis_settings.redis.model_copy(update={"port": 1})})  # nothing listens
    env = {**os.environ, **settings.to_env()}
    end = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    done = subprocess.run([sys.executable, "-m", "feature_repo.cli", "materialize-incremental", end], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Redis is not reachable at 127.0.0.1:1" in done.stderr
    assert not (tmp_path / "feast" / "online_store.db").exists()
