"""The label-joiner worker against the real broker: exact labels, exactly once, across kill -9, a broker
restart and a rebalance; quiet inputs and implausible event times handled."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter

import orjson
import pandas as pd
import pytest

from infra.kafka_broker import KafkaBroker
from infra.settings import get_settings
from infra.topics import group_lag, read_topic
from label_joiner.evaluate import expected_labels, join_accuracy
from label_joiner.rules import Rules
from label_joiner.worker import start_worker, stop_worker
from schemas import DeadLetter, MaturedLabel, TrainingExample, decode
from schemas.codec import schema_headers
from schemas.events import Click, Impression
from streams.simulator.config import SimulatorConfig
from tests.conftest import simulated_run

# A short conversion window so that a few simulated hours close every window; late deliveries included
# (late conversions inside their window are joined, late impressions and clicks are dead letters).
CFG = SimulatorConfig(hours=2, users=10_000, ads=2_000, impressions_per_hour=8_000, cvr=0.15, speed=0,
                      prediction_log=False, seed=11, late_share=0.02)
KILL_ROUNDS = int(os.environ.get("ADS_KILL_ROUNDS", "3"))
YEAR_MS = 365 * 86_400_000


@pytest.fixture
def run(fresh_topics, tmp_path):
    settings, gen = simulated_run(fresh_topics, tmp_path, CFG)
    return settings, gen, expected_labels(gen.truth, Rules.from_settings(settings.windows))


def inputs(settings) -> list[str]:
    t = settings.topics
    return [t.impressions, t.clicks, t.conversions]


def outputs(settings) -> tuple[pd.DataFrame, pd.DataFrame, list[DeadLetter]]:
    """Every committed record of the three output topics, repeats included."""
    t = settings.topics
    matured = pd.DataFrame([decode(MaturedLabel, r.value, r.headers).model_dump()
                            for r in read_topic(settings, t.matured_labels)])
    examples = pd.DataFrame([decode(TrainingExample, r.value, r.headers).model_dump()
                             for r in read_topic(settings, t.training_examples)])
    dead = [decode(DeadLetter, r.value, r.headers) for r in read_topic(settings, t.dead_letters)]
    return matured, examples, dead


def wait_until_done(settings, group: str, want: int, procs, timeout_s: float = 240) -> None:
    """Until ``want`` matured labels are committed and the group's input lag is closed."""
    deadline = time.monotonic() + timeout_s
    got = committed = total = -1
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, f"worker exited with {proc.returncode}"
        committed, total = group_lag(settings, group, inputs(settings))
        got = len(read_topic(settings, settings.topics.matured_labels))
        if got >= want and committed == total:
            return
        time.sleep(2)
    raise AssertionError(f"{got} of {want} matured labels, {committed} of {total} inputs committed after {timeout_s}s")


def run_worker_until_done(settings, want: int, log) -> None:
    """One worker of a fresh group, until ``want`` labels are committed and its lag is closed."""
    group = f"lj-{uuid.uuid4().hex[:6]}"
    proc = start_worker(settings, group, log)
    try:
        wait_until_done(settings, group, want, [proc])
    finally:
        stop_worker(proc)


def assert_exactly_once_and_exact(settings, gen, want: pd.DataFrame) -> list[DeadLetter]:
    matured, examples, dead = outputs(settings)
    assert not matured["impression_id"].duplicated().any(), "a matured label was written twice"
    assert not examples["example_id"].duplicated().any(), "a training example was written twice"
    assert len({d.dead_letter_id for d in dead}) == len(dead), "a dead letter was written twice"
    acc = join_accuracy(matured, gen.truth, Rules.from_settings(settings.windows))
    assert acc.exact and acc.expected == len(want), acc
    return dead


def produce(settings, topic: str, records: list[tuple[bytes, bytes, int]], headers) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for key, value, ts in records:
        producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=ts)
    producer.flush()
    producer.close()


def test_worker_labels_equal_ground_truth_and_distrust_implausible_times(run, tmp_path):
    """Exact labels; one impression dated years ahead and one click years old (record times like their
    neighbours') are dead-lettered and change no other impression's label."""
    settings, gen, want = run
    t0 = int(gen.schedule.delivery_ms[len(gen.schedule) // 3])
    bad_imp = Impression(impression_id="future-1", request_id="r", user_id=1, ad_id=1, advertiser_id=1,
                         campaign_id=1, placement="feed", position=0, device="mobile", bid=1.0,
                         event_time_ms=t0 + 5 * YEAR_MS, model_version="m", served_pctr=0.1, served_pcvr=0.1,
                         feature_ref="x")
    bad_click = Click(click_id="past-c", impression_id="past-1", user_id=1, ad_id=1, event_time_ms=t0 - 5 * YEAR_MS)
    for event, topic in ((bad_imp, settings.topics.impressions), (bad_click, settings.topics.clicks)):
        produce(settings, topic, [(event.key().encode(), orjson.dumps(event.model_dump()), t0)],
                schema_headers(type(event)))
    run_worker_until_done(settings, len(want), tmp_path / "worker.log")
    dead = assert_exactly_once_and_exact(settings, gen, want)
    reasons = Counter(d.reason.split(":")[0] for d in dead)
    assert reasons["future event time"] == 1 and reasons["event time older than retention"] == 1
    assert {"not JSON", "invalid impression", "late event"} <= set(reasons)


def test_kill_9_in_a_loop_exactly_once(run, tmp_path):
    """kill -9 at random moments, ``ADS_KILL_ROUNDS`` times (``make kill-loop`` runs many): every label
    exact, nothing missing, no output twice. After the second kill the local state is gone too (a new
    machine): the state comes back from the whole changelog."""
    import shutil

    settings, gen, want = run
    group = f"lj-{uuid.uuid4().hex[:6]}"
    rng = random.Random(5)
    for round_ in range(KILL_ROUNDS):
        proc = start_worker(settings, group, tmp_path / f"worker.{round_}.log")
        time.sleep(rng.uniform(3.0, 9.0))  # start-up takes ~2-3 s; the backlog ~10 s
        assert proc.poll() is None, f"worker exited with {proc.returncode}"
        stop_worker(proc, kill=True)
        if round_ == 1:
            shutil.rmtree(settings.var_dir / "state" / group)
    proc = start_worker(settings, group, tmp_path / "worker.last.log")
    try:
        wait_until_done(settings, group, len(want), [proc])
    finally:
        stop_worker(proc)
    assert_exactly_once_and_exact(settings, gen, want)


def test_broker_restart_loses_nothing(run, tmp_path):
    """The broker goes away mid-run for longer than the idle timeout and comes back: the worker rides it out
    (or, past its retries, exits and is restarted) and every label is exact, exactly once."""
    settings, gen, want = run
    broker = KafkaBroker(get_settings())  # the shared broker (the run's settings point var_dir elsewhere)
    group = f"lj-{uuid.uuid4().hex[:6]}"
    proc = start_worker(settings, group, tmp_path / "worker.log")
    try:
        time.sleep(6)
        broker.stop()
        time.sleep(settings.windows.idle_timeout_s + 2)
        broker.start()
        if proc.poll() is not None:  # a supervisor's restart
            proc = start_worker(settings, group, tmp_path / "worker.2.log")
        wait_until_done(settings, group, len(want), [proc], timeout_s=300)
    finally:
        stop_worker(proc)
        if not broker.ready():
            broker.start()
    assert_exactly_once_and_exact(settings, gen, want)


def test_second_worker_joining_mid_run_rebalances_without_loss(run, tmp_path):
    """A second worker of the same group joins mid-run: half of the tasks move to it with their state
    (from the changelog) and every label is still exact, exactly once."""
    settings, gen, want = run
    group = f"lj-{uuid.uuid4().hex[:6]}"
    first = start_worker(settings, group, tmp_path / "first.log")
    second = None
    try:
        time.sleep(5)
        second = start_worker(settings, group, tmp_path / "second.log")
        wait_until_done(settings, group, len(want), [first, second])
    finally:
        stop_worker(first)
        if second is not None:
            stop_worker(second)
    assert "restored" in (tmp_path / "second.log").read_text()
    assert_exactly_once_and_exact(settings, gen, want)


def test_quiet_conversions_do_not_stall_labelling(fresh_topics, tmp_path):
    """Two hours of impressions and clicks and not one conversion, sent live over ~40 s: the non-clicked
    impressions mature while the traffic still flows (the quiet input does not hold the clock back)."""
    import threading

    from streams.simulator.run import generate, send

    cfg = CFG.model_copy(update={"cvr": 1e-9, "late_share": 0.0, "seed": 3})
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    gen = generate(cfg, settings, drain=True)
    assert not gen.truth["converts"].any()
    want = expected_labels(gen.truth, Rules.from_settings(settings.windows))
    group = f"lj-{uuid.uuid4().hex[:6]}"
    proc = start_worker(settings, group, tmp_path / "worker.log")
    span_s = (cfg.end_ms - cfg.start_ms) / 1000
    sender = threading.Thread(target=send, args=(gen.schedule, settings, span_s / 40, cfg.start_ms))
    try:
        time.sleep(3)
        sender.start()
        time.sleep(30)
        assert sender.is_alive(), "the traffic should still be flowing"
        matured, examples, _ = outputs(settings)
    finally:
        sender.join()
        stop_worker(proc)
    assert len(matured) > 0.4 * (~want["clicked"]).sum(), f"only {len(matured)} matured while traffic flowed"
    assert not matured["clicked"].any()  # clicked ones wait for their conversion window
    noclick = set(examples.loc[~examples["clicked"], "impression_id"])
    assert set(matured["impression_id"]) <= noclick


def test_an_output_over_the_size_limit_becomes_a_truncated_dead_letter(fresh_topics, tmp_path):
    """Records over the broker's limit would fail the transaction again and again: each is written as a
    dead letter with its payload cut instead, and the worker goes on."""
    cfg = CFG.model_copy(update={"hours": 0.5, "seed": 8})
    settings, gen = simulated_run(fresh_topics, tmp_path, cfg)
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"max_record_bytes": 460})})
    want = expected_labels(gen.truth, Rules.from_settings(settings.windows))
    run_worker_until_done(settings, len(want), tmp_path / "worker.log")
    matured, examples, dead = outputs(settings)
    too_large = [d for d in dead if d.reason.startswith("output too large")]
    assert len(matured) == len(want) and len(examples) == 0  # every example is over 460 bytes
    assert len(too_large) >= len(want) and all(d.truncated and len(d.payload) <= 92 for d in too_large)
