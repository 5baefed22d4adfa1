"""The faust worker against the real broker: labels equal the ground truth, also across a kill -9."""

from __future__ import annotations

import time
import uuid

import pandas as pd
import pytest

from infra.kafka_broker import KafkaBroker
from infra.settings import get_settings
from infra.topics import group_lag, read_topic, topic_counts
from label_joiner.delay_curve import read_matured
from label_joiner.evaluate import join_accuracy
from label_joiner.worker import start_worker, stop_worker
from schemas import DeadLetter, MaturedLabel, decode
from streams.simulator.config import SimulatorConfig
from tests.conftest import consume_all, simulated_run

# A short conversion window so that a few simulated hours close every window.
CFG = SimulatorConfig(hours=2, users=10_000, ads=2_000, impressions_per_hour=8_000, cvr=0.08, speed=0,
                      prediction_log=False, seed=11)


@pytest.fixture
def run(fresh_topics, tmp_path):
    settings, gen = simulated_run(fresh_topics, tmp_path, CFG)
    expected = int((~gen.truth["impression_malformed"]).sum())  # each is matured or dead-lettered as late
    return settings, gen, expected


def wait_for_labels(settings, want: int, proc, timeout_s: float = 180) -> pd.DataFrame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "worker exited"
        matured = read_matured(settings)
        if len(matured) >= want:
            return matured
        time.sleep(2)
    raise AssertionError(f"only {len(matured)} of {want} matured labels after {timeout_s}s")


def late_impressions(settings) -> int:
    ids = set()
    for r in read_topic(settings, settings.topics.dead_letters):
        dl = decode(DeadLetter, r.value, r.headers)
        if dl.source_topic == settings.topics.impressions and dl.reason.startswith("late event"):
            ids.add(dl.payload)
    return len(ids)


def test_worker_labels_equal_ground_truth(run, tmp_path):
    settings, gen, expected = run
    proc = start_worker(settings, f"lj-{uuid.uuid4().hex[:6]}", tmp_path / "worker.log")
    try:
        matured = wait_for_labels(settings, expected - late_impressions(settings) - 50, proc)
        time.sleep(8)  # let the last windows close on idle inputs
        matured = read_matured(settings)
    finally:
        stop_worker(proc)
    acc = join_accuracy(matured, gen.truth, settings.windows)
    assert acc.exact, acc
    assert len(matured) + late_impressions(settings) == expected
    reasons = {decode(DeadLetter, r.value, r.headers).reason.split(":")[0]
               for r in consume_all(settings, settings.topics.dead_letters, 10)}
    assert {"not JSON", "invalid impression", "late event", "outside conversion window"} <= reasons


def wait_for_examples(settings, want: int, proc, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    topic = settings.topics.training_examples
    while topic_counts(settings, [topic])[topic] < want:
        assert proc.poll() is None, "worker exited"
        assert time.monotonic() < deadline, f"fewer than {want} training examples after {timeout_s}s"
        time.sleep(0.2)


def test_kill_9_and_restart_loses_nothing(run, tmp_path):
    settings, gen, expected = run
    app_id = f"lj-{uuid.uuid4().hex[:6]}"
    proc = start_worker(settings, app_id, tmp_path / "worker.log")
    try:
        # Examples follow the input closely (matured labels wait for the watermark): this kills the worker
        # in the middle of the backlog, with uncommitted input, unflushed outputs and unwritten state.
        wait_for_examples(settings, expected // 8, proc)
    finally:
        stop_worker(proc, kill=True)
    proc = start_worker(settings, app_id, tmp_path / "worker.log")
    try:
        wait_for_labels(settings, expected - late_impressions(settings) - 50, proc)
        time.sleep(8)
        t = settings.topics
        committed, total = group_lag(settings, app_id, [t.impressions, t.clicks, t.conversions])
    finally:
        stop_worker(proc)
    assert committed == total, f"the group committed {committed} of {total} input messages: its lag never closes"
    # Read every matured label, duplicates included: a replayed impression must repeat the same label.
    labels = pd.DataFrame([decode(MaturedLabel, r.value, r.headers).model_dump()
                           for r in read_topic(settings, settings.topics.matured_labels)])
    distinct = labels.drop_duplicates(["impression_id", "clicked", "converted", "click_time_ms",
                                       "conversion_time_ms"])
    twice = distinct[distinct["impression_id"].duplicated(keep=False)]
    assert twice.empty, f"impressions with two different labels:\n{twice.sort_values('impression_id').head(10)}"
    acc = join_accuracy(distinct, gen.truth, settings.windows)
    # Every impression has exactly its uninterrupted label: none lost, none changed by the replay.
    assert acc.exact, acc
    assert len(distinct) + late_impressions(settings) == expected


def test_broker_restart_loses_nothing(run, tmp_path):
    """The broker goes away mid-run for longer than the idle timeout and comes back: the worker rides it
    out (the silence is not taken for an idle stream) and every label is exact."""
    settings, gen, expected = run
    broker = KafkaBroker(get_settings())  # the shared broker (the run's settings point var_dir elsewhere)
    proc = start_worker(settings, f"lj-{uuid.uuid4().hex[:6]}", tmp_path / "worker.log")
    try:
        wait_for_examples(settings, expected // 8, proc)
        broker.stop()
        time.sleep(settings.windows.idle_timeout_s + 2)
        broker.start()
        wait_for_labels(settings, expected - late_impressions(settings) - 50, proc, timeout_s=240)
        time.sleep(8)
        matured = read_matured(settings)
    finally:
        stop_worker(proc)
        if not broker.ready():
            broker.start()
    acc = join_accuracy(matured, gen.truth, settings.windows)
    assert acc.exact, acc
    assert len(matured) + late_impressions(settings) == expected


def test_second_worker_joining_mid_run_rebalances_without_loss(run, tmp_path):
    """A second worker of the same app joins mid-run: half of the partitions move to it with their state
    (recovered from the changelog) and every label is still exact."""
    settings, gen, expected = run
    app_id = f"lj-{uuid.uuid4().hex[:6]}"
    first = start_worker(settings, app_id, tmp_path / "first.log")
    second = None
    try:
        wait_for_examples(settings, expected // 8, first)
        second = start_worker(settings, app_id, tmp_path / "second.log")
        wait_for_labels(settings, expected - late_impressions(settings) - 50, first, timeout_s=240)
        time.sleep(10)
        assert second.poll() is None, "the second worker exited"
        matured = read_matured(settings)
    finally:
        stop_worker(first)
        if second is not None:
            stop_worker(second)
    assert "rebalanced; owns input partitions" in (tmp_path / "second.log").read_text()
    acc = join_accuracy(matured, gen.truth, settings.windows)
    assert acc.exact, acc
    assert len(matured) + late_impressions(settings) == expected
