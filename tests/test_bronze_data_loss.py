"""Bronze never stalls and never hides lost records (issue 21, item 2), on the real broker and Delta:

* a range holding only an aborted transaction (its records and the abort marker) is committed empty, so the
  records sent after it land: before, the empty commit's idempotent-write id repeated and every later run
  skipped;
* records deleted before they were landed fail the run, as Spark's ``failOnDataLoss`` does, also in a partition
  added since the last run; ``accept_loss`` lands the rest and records the loss in the commit's metadata;
* a deleted and re-created topic fails the run instead of landing nothing for ever.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions, NewTopic

from batch_jobs import bronze
from infra.spark_session import spark_session
from schemas.codec import encode
from schemas.events import Click

CLICKS = next(s for s in bronze.SOURCES if s.table == "clicks")
NOW_MS = int(time.time() * 1000)


def clicks(n: int, tag: str) -> list[Click]:
    return [Click(click_id=f"{tag}-c{i}", impression_id=f"{tag}-i{i}", user_id=i, ad_id=i,
                  event_time_ms=NOW_MS - 60_000 + i) for i in range(n)]


def send(settings, events: list[Click], partition: int | None = None, abort: bool = False) -> None:
    """Send ``events`` in one transaction (committed, or aborted: records plus an abort marker)."""
    producer = KafkaProducer(**settings.kafka.client_config(), transactional_id=f"t-{time.monotonic_ns()}",
                             enable_idempotence=True, acks="all")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        for event in events:
            key, value, headers = encode(event)
            producer.send(settings.topics.clicks, value=value, key=key, headers=headers, partition=partition)
        producer.flush()
        producer.abort_transaction() if abort else producer.commit_transaction()
    finally:
        producer.close()


def rows(settings) -> list[str]:
    frame = spark_session("test", settings).read.format("delta").load(bronze.table_path(settings, CLICKS))
    return sorted(r[0] for r in frame.select("click_id").collect())


def partitions(settings) -> int:
    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        return len(admin.describe_topics([settings.topics.clicks])[0]["partitions"])
    finally:
        admin.close()


def land(settings, accept_loss: bool = False) -> bronze.Landed:
    return bronze.land(spark_session("test", settings), settings, CLICKS, None, accept_loss)


def test_a_range_of_only_an_aborted_transaction_does_not_stall_bronze(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    send(settings, clicks(3, "a"))
    assert land(settings).records == 3
    send(settings, clicks(5, "aborted"), abort=True)  # offsets 4..8 aborted, 9 the marker (partition by key)
    empty = land(settings)
    assert empty.records == 0 and not empty.raced
    assert sum(empty.span.end.values()) > sum(empty.span.start.values())  # the range moved on, committed empty
    send(settings, clicks(4, "b"))
    after = land(settings)
    assert after.records == 4 and not after.raced, after
    assert rows(settings) == sorted([e.click_id for e in clicks(3, "a")] + [e.click_id for e in clicks(4, "b")])
    assert land(settings).records == 0  # and nothing again


def test_records_deleted_before_landing_fail_the_run_until_accepted(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    topic = settings.topics.clicks
    send(settings, clicks(4, "a"), partition=0)
    assert land(settings).records == 4
    send(settings, clicks(6, "b"), partition=0)  # offsets 5..10 (4 is the first commit marker)
    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        admin.delete_records({TopicPartition(topic, 0): 8})
        # A partition added since the last run, whose first records are gone too: noticed as well.
        admin.create_partitions({topic: NewPartitions(total_count=partitions(settings) + 1)})
        new = partitions(settings) - 1
        send(settings, clicks(3, "n"), partition=new)
        admin.delete_records({TopicPartition(topic, new): 2})
    finally:
        admin.close()
    with pytest.raises(bronze.DataLossError, match=r"partition 0: offsets 5..7 were deleted by retention") as err:
        land(settings)
    assert f"partition {new}: offsets 0..1 were deleted" in str(err.value)
    assert len(rows(settings)) == 4  # nothing landed by the failed run
    accepted = land(settings, accept_loss=True)
    assert accepted.span.lost == {0: 3, new: 2}
    assert bronze.last_commit(spark_session("test", settings), bronze.table_path(settings, CLICKS))["lost"] == {
        "0": 3, str(new): 2}
    assert rows(settings) == sorted([f"a-c{i}" for i in range(4)] + ["b-c3", "b-c4", "b-c5", "n-c2"])
    assert land(settings).records == 0  # the loss is settled: the next run is clean


def test_a_re_created_topic_fails_the_run_instead_of_landing_nothing(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    topic = settings.topics.clicks
    send(settings, clicks(6, "old"), partition=0)
    assert land(settings).records == 6
    n = partitions(settings)
    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + 30
        while topic in admin.list_topics() and time.monotonic() < deadline:
            time.sleep(0.2)
        while True:  # the broker finishes the deletion in the background
            try:
                admin.create_topics([NewTopic(topic, n, settings.kafka.replication_factor)])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        admin.close()
    send(settings, clicks(2, "new"), partition=0)  # ends at offset 3, before the 7 landed
    with pytest.raises(bronze.DataLossError, match="deleted and re-created"):
        land(settings)
    accepted = land(settings, accept_loss=True)
    assert accepted.records == 2 and accepted.span.reset == [0]
    assert set(rows(settings)) == {f"old-c{i}" for i in range(6)} | {"new-c0", "new-c1"}
    send(settings, clicks(3, "later"), partition=0)
    assert land(settings).records == 3  # the re-created partition goes on from where the reset run ended
