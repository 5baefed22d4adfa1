"""The same code on a 3-node KRaft cluster (issue 21): topics replicated 3 times with min ISR 2, two label-joiner
processes of one group sharing the partitions, and one node killed (kill -9) mid-run. Every label exact, none
written twice. ``make cluster`` runs it (marker ``cluster``: left out of ``make test``, which runs on one broker).
"""

from __future__ import annotations

import time
import uuid

import pytest

from infra.kafka_cluster import KafkaCluster
from infra.settings import get_settings
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
        assert all(len(p["replicas"]) == 3 for p in described["partitions"]), described
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
        wait_until_done(settings, group, len(want), procs, timeout_s=420)
    finally:
        for proc in procs:
            stop_worker(proc)
        cluster.restart(killed)
    assert_exactly_once_and_exact(settings, gen, want)
