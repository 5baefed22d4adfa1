"""The wait for a stream worker to settle (real broker): a group that commits more slowly than the poll interval
is not taken for settled; a group that has read everything ends the wait at once; a group that stopped short ends
it after the quiet window."""

from __future__ import annotations

import threading
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from infra.demo import wait_until_still
from infra.topics import group_lag

MESSAGES = 10


def topic_with_messages(settings) -> str:
    topic = f"t{uuid.uuid4().hex[:8]}-settle"
    producer = KafkaProducer(**settings.kafka.client_config())
    try:
        for i in range(MESSAGES):
            producer.send(topic, value=str(i).encode(), partition=0)
        producer.flush()
    finally:
        producer.close()
    return topic


def commit_in_steps(settings, topic: str, group: str, offsets: list[int], every_s: float) -> None:
    """Commit ``offsets`` of partition 0 one after another, ``every_s`` apart (a worker's batches)."""
    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=group, enable_auto_commit=False)
    try:
        for i, offset in enumerate(offsets):
            if i:
                time.sleep(every_s)
            consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def test_a_group_committing_slower_than_the_poll_is_waited_for(kafka_settings):
    topic, group = topic_with_messages(kafka_settings), f"settle-{uuid.uuid4().hex[:8]}"
    commit_in_steps(kafka_settings, topic, group, [2], 0)
    # Commits 4 s apart, polls 1 s apart: two equal polls in a row, but never a quiet window of 6 s.
    worker = threading.Thread(target=commit_in_steps, args=(kafka_settings, topic, group, [4, 6, 8, MESSAGES], 4.0))
    worker.start()
    try:
        wait_until_still(kafka_settings, group, [topic], timeout_s=60, quiet_s=6, poll_s=1)
        assert group_lag(kafka_settings, group, [topic]) == (MESSAGES, MESSAGES)
    finally:
        worker.join()


def test_a_caught_up_group_ends_the_wait_at_once_and_one_stopped_short_after_the_quiet_window(kafka_settings):
    topic = topic_with_messages(kafka_settings)
    done, short = f"settle-{uuid.uuid4().hex[:8]}", f"settle-{uuid.uuid4().hex[:8]}"
    commit_in_steps(kafka_settings, topic, done, [MESSAGES], 0)
    commit_in_steps(kafka_settings, topic, short, [6], 0)

    began = time.monotonic()
    wait_until_still(kafka_settings, done, [topic], timeout_s=60, quiet_s=30, poll_s=1)
    assert time.monotonic() - began < 15

    began = time.monotonic()
    wait_until_still(kafka_settings, short, [topic], timeout_s=60, quiet_s=4, poll_s=1)
    waited = time.monotonic() - began
    assert 4 <= waited < 30
    assert group_lag(kafka_settings, short, [topic]) == (6, MESSAGES)
