"""The prediction logger against the real broker: delivery, spooling while Kafka is down, the spool bound,
survival of a process restart and of a broker restart (at least once; readers dedupe by impression id)."""

from __future__ import annotations

import time
import uuid

from infra.kafka_broker import KafkaBroker
from infra.settings import Settings, get_settings
from schemas.codec import decode
from schemas.events import PredictionLog
from streams.serving.prediction_log import PredictionLogger
from tests.conftest import consume_all


def make_records(n: int, tag: str = "") -> list[PredictionLog]:
    run, now = tag or uuid.uuid4().hex[:6], int(time.time() * 1000)
    return [PredictionLog(request_id=f"{run}-r{i // 4}", impression_id=f"{run}-i{i}", user_id=i % 97, ad_id=i,
                          model_version="v-test", event_time_ms=now + i, features={"user_features__ctr_7d": i / n},
                          pctr=0.01 + (i % 50) / 100, pcvr=0.1, campaign_id=i % 7, placement="feed", position=i % 5,
                          bid=1.5, feature_lists={"user_realtime__user_recent_ad_ids": [1.0, 2.0]}, ecpm=0.3,
                          arm="control")
            for i in range(n)]


def with_serving(settings: Settings, **update) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=update)})


def dead_kafka(settings: Settings) -> Settings:
    """The same settings with Kafka at a port nothing listens on."""
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})})


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_back(settings: Settings, want: set[str], timeout_s: float = 30.0) -> list[PredictionLog]:
    """Every record on the prediction-log topic until all of ``want`` (impression ids) arrived."""
    topic, records = settings.topics.prediction_log, consume_all(settings, settings.topics.prediction_log, len(want),
                                                                  timeout_s)
    for _ in range(5):
        missing = want - {r.key.decode() for r in records}
        if not missing:
            break
        records = consume_all(settings, topic, len(records) + len(missing), timeout_s)
    return [decode(PredictionLog, r.value, r.headers) for r in records]


def test_records_arrive_while_kafka_is_up(fresh_topics, tmp_path):
    logger = PredictionLogger(fresh_topics, tmp_path / "spool").start()
    records = make_records(300)
    try:
        logger.log(records[:100])
        logger.log(records[100:])
        assert logger.flush(30)
        stats = logger.stats()
    finally:
        logger.close()
    assert stats["sent"] == 300 and stats["dropped"] == 0 and stats["spooled"] == 0, stats
    assert stats["kafka_up"] == 1
    got = read_back(fresh_topics, {r.impression_id for r in records})
    assert len(got) == 300
    assert sorted(got, key=lambda r: r.ad_id) == records


def test_kafka_down_spools_and_the_next_start_sends(fresh_topics, tmp_path):
    spool = tmp_path / "spool"
    logger = PredictionLogger(dead_kafka(fresh_topics), spool).start()
    records = make_records(1000)
    try:
        logger.log(records)  # returns at once: nothing is sent from the caller's thread
        wait_for(lambda: logger.stats()["spooled"] == 1000, 30, "the records to reach the spool")
        stats = logger.stats()
        assert stats["dropped"] == 0 and stats["kafka_up"] == 0 and stats["sent"] == 0, stats
        assert not logger.flush(0.5)
    finally:
        logger.close()
    assert list(spool.glob("seg-*.jsonl"))

    # The "restarted" serving process: the same spool, Kafka reachable.
    logger = PredictionLogger(fresh_topics, spool).start()
    try:
        assert logger.stats()["recovered"] == 1000
        assert logger.flush(30), logger.stats()
        stats = logger.stats()
    finally:
        logger.close()
    assert stats["sent"] == 1000 and stats["spooled"] == 0 and stats["dropped"] == 0, stats
    assert not list(spool.glob("seg-*.jsonl"))
    got = read_back(fresh_topics, {r.impression_id for r in records})
    assert {r.impression_id: r for r in got} == {r.impression_id: r for r in records}


def test_torn_spool_line_is_dropped_and_counted(fresh_topics, tmp_path):
    spool = tmp_path / "spool"
    logger = PredictionLogger(dead_kafka(fresh_topics), spool).start()
    records = make_records(10)
    try:
        logger.log(records)
        wait_for(lambda: logger.stats()["spooled"] == 10, 30, "the records to reach the spool")
    finally:
        logger.close()
    segment = sorted(spool.glob("seg-*.jsonl"))[-1]
    data = segment.read_bytes()
    segment.write_bytes(data[:-40])  # a crash in the middle of the last write
    logger = PredictionLogger(fresh_topics, spool).start()
    try:
        assert logger.flush(30), logger.stats()
        stats = logger.stats()
    finally:
        logger.close()
    assert stats["recovered"] == 9 and stats["dropped_corrupt"] == 1 and stats["sent"] == 9, stats
    got = read_back(fresh_topics, {r.impression_id for r in records[:9]})
    assert {r.impression_id for r in got} == {r.impression_id for r in records[:9]}


def test_spool_bound_drops_are_counted(fresh_topics, tmp_path):
    settings = with_serving(dead_kafka(fresh_topics), log_spool_bytes=8_000)
    logger = PredictionLogger(settings, tmp_path / "spool").start()
    try:
        for chunk in range(5):
            logger.log(make_records(40, tag=f"c{chunk}"))
        wait_for(lambda: logger.stats()["queued"] == 0, 30, "the queue to drain")
    finally:
        logger.close()
    s = logger.stats()
    assert s["dropped_spool_full"] > 0 and s["spooled"] > 0, s
    assert s["spool_bytes"] <= 8_000, s
    assert s["logged"] == 200 and s["logged"] == s["sent"] + s["spooled"] + s["dropped"], s


def test_queue_bound_drops_are_counted(fresh_topics, tmp_path):
    settings = with_serving(dead_kafka(fresh_topics), log_queue_records=50)
    logger = PredictionLogger(settings, tmp_path / "spool")  # not started: nothing drains the queue
    logger.log(make_records(80))
    s = logger.stats()
    assert s["dropped_queue_full"] == 30 and s["queued"] == 50 and s["logged"] == 80, s


def test_broker_restart_loses_nothing(fresh_topics, tmp_path):
    broker = KafkaBroker(get_settings())
    logger = PredictionLogger(fresh_topics, tmp_path / "spool").start()
    before, during, after = make_records(200, "b"), make_records(200, "d"), make_records(200, "a")
    try:
        logger.log(before)
        assert logger.flush(30), logger.stats()
        try:
            broker.stop()
            logger.log(during[:100])
            wait_for(lambda: logger.stats()["kafka_up"] == 0, 30, "the logger to notice the outage")
            logger.log(during[100:])
            wait_for(lambda: logger.stats()["spooled"] == 200, 30, "the outage's records to reach the spool")
        finally:
            broker.start()
        assert broker.ready()
        logger.log(after)
        assert logger.flush(60), logger.stats()
        stats = logger.stats()
    finally:
        logger.close()
    assert stats["sent"] == 600 and stats["dropped"] == 0 and stats["spooled"] == 0, stats
    want = {r.impression_id for r in before + during + after}
    got = read_back(fresh_topics, want, timeout_s=60)
    ids = [r.impression_id for r in got]
    assert set(ids) == want, f"missing {len(want - set(ids))}, duplicates {len(ids) - len(set(ids))}"


KILLED_AFTER_LOGGING = """
import os, signal, sys
from tests.test_prediction_logger import make_records
from infra.settings import get_settings
from streams.serving.prediction_log import PredictionLogger

logger = PredictionLogger(get_settings(), sys.argv[1])  # its sender never runs: everything is only queued
logger.log(make_records(2500, tag=sys.argv[2]))  # a request answered; then the process is killed
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_records_logged_before_a_kill_9_are_sent_by_the_next_start(fresh_topics, tmp_path):
    """``log()`` returned (the response went out), then ``kill -9`` before the sender ran: the journal keeps the
    records and the next start on the same spool sends every one of them."""
    import os
    import subprocess
    import sys

    spool, tag = tmp_path / "spool", uuid.uuid4().hex[:6]
    child = subprocess.run([sys.executable, "-c", KILLED_AFTER_LOGGING, str(spool), tag], timeout=120,
                           env={**os.environ, **fresh_topics.to_env()})
    assert child.returncode == -9, child
    assert list((spool / "journal").glob("wal-*.jsonl")), "nothing was journaled"

    logger = PredictionLogger(fresh_topics, spool).start()
    try:
        assert logger.stats()["recovered"] == 2500
        assert logger.flush(30), logger.stats()
        stats = logger.stats()
    finally:
        logger.close()
    assert stats["sent"] == 2500 and stats["dropped"] == 0 and stats["spooled"] == 0, stats
    assert not list((spool / "journal").glob("wal-*.jsonl")) and not list(spool.glob("seg-*.jsonl"))
    want = make_records(2500, tag=tag)
    got = read_back(fresh_topics, {r.impression_id for r in want})
    assert {r.impression_id for r in got} == {r.impression_id for r in want}
