"""The pipeline against a Kafka broker that wants SASL/SCRAM and a Redis that lets in one ACL user (issue 21),
both started here on their own ports: the simulator's events go through the label joiner and the real-time
features worker (rows in Redis, read back through Feast), and bronze lands them through Spark's Kafka source.
Clients without the credentials are refused, and no log or report written holds either password."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra.kafka_broker import KafkaBroker
from infra.redis_server import RedisServer
from infra.settings import ROOT, get_settings
from infra.topics import group_lag, topic_counts, with_topic_prefix
from label_joiner.evaluate import expected_labels
from label_joiner.rules import Rules
from label_joiner.worker import start_worker, stop_worker
from streams.simulator.config import SimulatorConfig
from tests.conftest import simulated_run

CFG = SimulatorConfig(hours=1, users=300, ads=200, impressions_per_hour=2_000, speed=0, seed=29,
                      prediction_log=False)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A SCRAM broker on 39092 and an ACL Redis on 36379, with fresh random passwords."""
    base = get_settings()
    home = tmp_path_factory.mktemp("secured")
    kafka = base.kafka.model_copy(update={
        "bootstrap_servers": "127.0.0.1:39092", "controller_port": 39093, "heap": "512m",
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "ads",
        "sasl_password": f"kp-{uuid.uuid4().hex}"})
    redis = base.redis.model_copy(update={"port": 36379, "username": "ads-app", "password": f"rp-{uuid.uuid4().hex}"})
    settings = base.model_copy(update={"var_dir": home, "kafka": kafka, "redis": redis})
    broker, server = KafkaBroker(settings), RedisServer(settings)
    server.start()
    broker.start()
    yield settings
    broker.stop()
    server.stop()


def secrets_in(folder: Path, secrets: list[str]) -> list[str]:
    """Every file under ``folder`` (logs, reports, configs Feast reads) that holds one of ``secrets``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and path.name not in ("server.properties", "users.acl", "meta.properties"):
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


def test_the_pipeline_runs_on_sasl_scram_kafka_and_acl_redis(secured, tmp_path):
    import redis
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    settings = secured
    secrets = [settings.kafka.sasl_password, settings.redis.password]
    # Without the credentials: refused.
    wrong = settings.kafka.model_copy(update={"sasl_password": "not-the-password"})
    with pytest.raises(KafkaError):
        KafkaAdminClient(**wrong.client_config(), request_timeout_ms=5000).list_topics()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=settings.redis.port, socket_timeout=5).set("x", "1")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=settings.redis.port, username="ads-app", password="no").ping()

    topics = with_topic_prefix(settings.model_copy(update={"var_dir": tmp_path}), f"s{uuid.uuid4().hex[:6]}")
    run, gen = simulated_run(topics, tmp_path, CFG)
    want = expected_labels(gen.truth, Rules.from_settings(run.windows))
    joiner_group, realtime_group = f"lj-{uuid.uuid4().hex[:6]}", f"rt-{uuid.uuid4().hex[:6]}"
    joiner = start_worker(run, joiner_group, tmp_path / "joiner.log")
    realtime = start_worker(run, realtime_group, tmp_path / "realtime.log", app_module="streams.realtime_app")
    t = run.topics
    try:
        deadline, last = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            for proc in (joiner, realtime):
                assert proc.poll() is None, f"a worker exited: {proc.returncode}"
            labels = topic_counts(run, [t.matured_labels])[t.matured_labels]
            fanout = group_lag(run, f"{realtime_group}-fanout", [t.impressions, t.clicks])
            entities = group_lag(run, f"{realtime_group}-entities", [t.realtime_entity_events])
            # Stage 2's input is transactional (commit markers): done when its commits stop moving.
            if labels >= len(want) and fanout[0] == fanout[1] and entities[0] > 0 and entities == last:
                break
            last = entities
            time.sleep(3)
        else:
            raise AssertionError(f"not done after 240 s: {labels} of {len(want)} labels, {fanout} {entities}")
    finally:
        stop_worker(joiner)
        stop_worker(realtime)
    client = run.redis.client()
    assert client.dbsize() > 0  # the real-time rows, written as the ACL user

    from feature_repo.store import feature_store

    store = feature_store(run, "redis")
    user = int(gen.truth["user_id"].iloc[0])
    row = store.get_online_features(features=["user_realtime:user_impressions_24h"],
                                    entity_rows=[{"user_id": user}]).to_dict()
    assert row["user_id"] == [user] and "user_impressions_24h" in row  # Feast got in as the ACL user
    # The bulk loader logs in as the ACL user too; Feast reads back what it wrote.
    import random

    import pandas as pd

    from feature_repo.bulk import bulk_write
    from schemas.features import AdFeatures
    from tests.test_online_store import random_row

    ad = random_row(AdFeatures, {"ad_id": 987_654}, random.Random(3), datetime.now(UTC))
    assert bulk_write(run, AdFeatures, pd.DataFrame([ad]), processes=1) == 1
    got = store.get_online_features(features=["ad_features:ad_ctr_7d"], entity_rows=[{"ad_id": 987_654}]).to_dict()
    assert got["ad_ctr_7d"] == [pytest.approx(ad["ad_ctr_7d"])]

    env = {**os.environ, **run.to_env()}
    done = subprocess.run([sys.executable, "-m", "batch_jobs.bronze", "--ds", datetime.now(UTC).date().isoformat()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (tmp_path / "bronze.out").write_text(done.stdout + done.stderr)
    from batch_jobs import bronze
    from infra.spark_session import spark_session

    spark = spark_session("test", run)
    counts = topic_counts(run, [s.topic(run) for s in bronze.SOURCES])
    landed = [s for s in bronze.SOURCES if counts[s.topic(run)] > 0]  # (no catalog, no prediction log here)
    assert {s.table for s in landed} >= {"impressions", "clicks"}
    for source in landed:
        assert spark.read.format("delta").load(bronze.table_path(run, source)).count() == counts[source.topic(run)]

    leaks = secrets_in(tmp_path, secrets) + secrets_in(settings.var_dir, secrets)
    assert leaks == [], leaks
