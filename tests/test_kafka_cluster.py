"""The same code on a 3-node KRaft cluster (issue 21): topics replicated 3 times with min ISR 2, two label-joiner
processes of one group sharing the partitions, and one node killed (kill -9) mid-run. Every label exact, none
written twice. ``make cluster`` runs it (marker ``cluster``: left out of ``make test``, which runs on one broker).
"""

from __future__ import annotations

import time
import uuid

import pytest
from kafka.errors import KafkaError

from infra.kafka_cluster import KafkaCluster
from infra.settings import get_settings
from infra.spark_standalone import SparkStandalone
from infra.topics import with_topic_prefix
from label_joiner.evaluate import expected_labels
from label_joiner.rules import Rules
from label_joiner.worker import start_worker, stop_worker
from tests.conftest import simulated_run
from tests.test_label_joiner_worker import CFG, assert_exactly_once_and_exact, wait_until_done

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    cluster = KafkaCluster(get_settings())
    cluster.start()
    yield cluster
    cluster.stop()


def test_two_joiners_on_three_brokers_survive_a_killed_broker(cluster, tmp_path):
    from kafka import KafkaAdminClient

    topics = with_topic_prefix(cluster.settings, f"c{uuid.uuid4().hex[:8]}")
    admin = KafkaAdminClient(**topics.kafka.client_config())
    try:
        described = admin.describe_topics([topics.topics.impressions])[0]
        replicas = [p.get("replica_nodes") or p.get("replicas") or [] for p in described["partitions"]]
        assert replicas and all(len(r) == 3 for r in replicas), described
    finally:
        admin.close()
    settings, gen = simulated_run(topics, tmp_path, CFG)
    want = expected_labels(gen.truth, Rules.from_settings(settings.windows))
    group = f"lj-{uuid.uuid4().hex[:6]}"
    procs = [start_worker(settings, group, tmp_path / f"joiner{i}.log") for i in range(2)]
    killed = 2
    try:
        members = []
        deadline = time.monotonic() + 60
        while len(members) < 2 and time.monotonic() < deadline:  # both joiners own partitions, mid-run
            time.sleep(2)
            admin = KafkaAdminClient(**settings.kafka.client_config())
            try:
                members = admin.describe_groups([group])[group].get("members", [])
            finally:
                admin.close()
        assert len(members) == 2, members
        cluster.kill(killed)
        # A joiner that cannot reach the transaction coordinator while leadership moves exits (code 70) and
        # resumes from its last commit when restarted: what its supervisor (systemd, Kubernetes) does.
        restarts, deadline = 0, time.monotonic() + 420
        while time.monotonic() < deadline:
            for i, proc in enumerate(procs):
                if proc.poll() is not None:
                    restarts += 1
                    procs[i] = start_worker(settings, group, tmp_path / f"joiner{i}.{restarts}.log")
            try:
                wait_until_done(settings, group, len(want), procs, timeout_s=10)
                break
            except AssertionError:
                continue
            except KafkaError as err:  # this watcher's own client asked the killed node for metadata: ask again
                print(f"cluster: watcher retries after {err!r}", flush=True)
                continue
        else:
            raise AssertionError(f"not done after 420 s ({restarts} supervisor restarts)")
        print(f"cluster: done with node {killed} down, {restarts} joiner restarts", flush=True)
    finally:
        for proc in procs:
            stop_worker(proc)
        cluster.restart(killed)
    assert_exactly_once_and_exact(settings, gen, want)


@pytest.fixture(scope="module")
def standalone():
    spark = SparkStandalone(get_settings())
    spark.start()
    yield spark
    spark.stop()


def test_bronze_silver_gold_on_spark_standalone_from_the_cluster(cluster, standalone, tmp_path):
    """The batch jobs as users run them (``python -m batch_jobs.<job>``), submitted to a standalone master and
    reading the 3-node cluster: every record landed once, silver's labels equal the simulator's truth."""
    import os
    import subprocess
    import sys
    from datetime import UTC, datetime

    from batch_jobs import bronze, silver
    from batch_jobs.gold import gold_path
    from infra.settings import ROOT
    from infra.spark_session import spark_session
    from infra.spark_standalone import standalone_settings
    from infra.topics import topic_counts
    from schemas.features import GOLD_TABLES
    from streams.simulator.run import send_catalog

    topics = with_topic_prefix(cluster.settings, f"s{uuid.uuid4().hex[:8]}")
    settings, gen = simulated_run(topics, tmp_path, CFG)
    send_catalog(gen.campaigns, settings)
    settings = standalone_settings(settings)
    env = {**os.environ, **settings.to_env()}
    ds = CFG.start.date().isoformat()
    before = set((standalone.home / "work").glob("app-*"))
    for job, day in (("bronze", datetime.now(UTC).date().isoformat()), ("silver", ds), ("gold", ds)):
        done = subprocess.run([sys.executable, "-m", f"batch_jobs.{job}", "--ds", day], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{job}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    apps = set((standalone.home / "work").glob("app-*")) - before
    assert len(apps) >= 3, apps  # the three jobs ran as applications of the standalone master

    local = settings.model_copy(update={"spark": settings.spark.model_copy(update={"master": "local[2]"})})
    spark = spark_session("test", local)
    counts = topic_counts(settings, [s.topic(settings) for s in bronze.SOURCES])
    for source in [s for s in bronze.SOURCES if counts[s.topic(settings)] > 0]:  # (no prediction log here)
        frame = spark.read.format("delta").load(bronze.table_path(settings, source))
        assert frame.count() == counts[source.topic(settings)], source.table
        assert frame.select("kafka_partition", "kafka_offset").distinct().count() == frame.count()
    want = expected_labels(gen.truth, Rules.from_settings(settings.windows))
    got = spark.read.format("delta").load(silver.silver_path(settings)).toPandas().set_index("impression_id")
    assert sorted(got.index) == sorted(want.index)
    assert (got.loc[want.index, "clicked"].astype(bool) == want["clicked"].astype(bool)).all()
    assert (got.loc[want.index, "converted"].astype(bool) == want["converted"].astype(bool)).all()
    for table in GOLD_TABLES:
        assert spark.read.format("delta").load(gold_path(settings, table)).count() > 0, table.VIEW
