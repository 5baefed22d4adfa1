"""The RocksDB task store: commit, due index, reopen and restore from changelog records (the last test: on the
real broker, an invalid local checkpoint)."""

from __future__ import annotations

import orjson

from streams.state import MemoryStore, RocksStore, decode_record, encode_record


def test_rocks_store_keeps_records_and_due_times_across_reopen(tmp_path):
    s = RocksStore(tmp_path / "p0")
    s.put("a", {"d": 100, "v": 1})
    s.put("b", {"d": 300, "v": 2})
    s.put("c", {"v": 3})  # no due time
    assert s.due(200) == ["a"]  # pending records count before they are committed
    s.commit(changelog_next=3)
    s.put("a", {"d": 500, "v": 1})  # re-scheduled: its old due key is stale now
    s.commit(changelog_next=4)
    s.close()

    s = RocksStore(tmp_path / "p0")
    assert s.changelog_next == 4 and s.get("c") == {"v": 3}
    due = s.due(400)
    assert due[0] == "a" and "b" in due  # the stale key comes back once; its record says d=500
    assert s.get("a")["d"] == 500
    s.delete("b")
    s.commit(changelog_next=5)
    assert s.due(400) == [] and s.count() == 2
    assert s.due(600) == ["a"]


def test_restore_from_changelog_equals_the_original(tmp_path):
    original = MemoryStore()
    for i in range(100):
        original.put(f"k{i}", {"d": i * 10, "i": i})
    original.delete("k7")
    changes = original.changes()
    restored = RocksStore(tmp_path / "p1")
    restored.restore(changes, changelog_next=len(changes))
    original.commit()
    assert restored.count() == 99 and restored.get("k7") is None and restored.get("k8") == {"d": 80, "i": 8}
    assert restored.due(55) == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert restored.changelog_next == 100


def test_records_are_messagepack_and_json_records_from_before_still_read(tmp_path):
    """The store and the changelog hold MessagePack, the bytes the changelog got are the bytes stored (encoded
    once); a record written as JSON by the version before (a local store, or a changelog restored on a new
    machine) reads back equal, due time included."""
    record = {"imp": {"t": 1_700_000_000_000, "user_id": 7, "placement": "feed"}, "click": None, "held": [],
              "seen": ["cl:c1"], "sent": {"click": "c1"}, "d": 1_700_000_030_000, "w": 0.25}
    s = RocksStore(tmp_path / "p0")
    s.put("new", record)
    (key, value), = s.changes()
    assert key == b"new" and value == encode_record(record) and value[:1] != b"{"
    assert len(value) < len(orjson.dumps(record))
    s.commit(changelog_next=1)
    assert s.db.get(b"rnew") == value and s.get("new") == record
    s.db.put(b"rold", orjson.dumps(record))  # a local record of the version before
    assert s.get("old") == record
    s.restore([(b"json", orjson.dumps(record)), (b"mp", value), (b"gone", value), (b"gone", None)],
              changelog_next=5)
    assert s.get("json") == record == s.get("mp") and s.get("gone") is None
    assert s.due(1_700_000_030_001) == ["json", "mp", "new"]
    assert decode_record(orjson.dumps(record)) == decode_record(value) == record


def test_a_checkpoint_outside_the_changelog_is_wiped_and_restored(kafka_settings, tmp_path):
    """Real broker: a local store whose saved changelog offset lies past the changelog's end (the topic was
    re-created, or the store belongs to another topic's life) is not trusted: it is wiped and the whole changelog
    restored, so a key deleted in the changelog does not come back from the stale local copy."""
    import asyncio
    import uuid

    import orjson
    from kafka import KafkaProducer

    from infra.topics import ensure_changelog
    from streams.engine import Engine, EngineConfig

    group = f"g{uuid.uuid4().hex[:8]}"
    config = EngineConfig(group_id=group, inputs=[kafka_settings.topics.impressions], dead_letter_topic="unused",
                          stage="test", state_dir=tmp_path)
    ensure_changelog(kafka_settings, config.changelog_topic, config.inputs)
    producer = KafkaProducer(**kafka_settings.kafka.client_config(), acks="all")
    for key, value in ((b"a", {"x": 1}), (b"b", {"x": 2}), (b"a", None)):
        producer.send(config.changelog_topic, key=key, value=None if value is None else orjson.dumps(value),
                      partition=0)
    producer.flush()
    producer.close()

    stale = RocksStore(tmp_path / group / "0")
    stale.put("a", {"x": 1})  # deleted since, in the changelog
    stale.put("stale", {"x": 9})
    stale.commit(changelog_next=10_000)  # past the changelog's end (3)
    engine = Engine(kafka_settings, config, make_processor=None)
    store = asyncio.run(engine.restore_task(0, stale))
    try:
        assert engine.counts["local state wiped"] == 1
        assert store.get("stale") is None and store.get("a") is None and store.get("b") == {"x": 2}
        assert store.changelog_next == 3
    finally:
        store.close()

    # A valid checkpoint is trusted: only the tail after it is read.
    store = RocksStore(tmp_path / group / "0")
    engine = Engine(kafka_settings, config, make_processor=None)
    store = asyncio.run(engine.restore_task(0, store))
    assert engine.counts["local state wiped"] == 0 and store.get("b") == {"x": 2}
    store.close()


def test_task_locks_and_cleaning_of_unowned_task_folders(tmp_path):
    """Issue 18, item 7: a task's folder is locked by its owner (another process, here a second StateDirectory with
    its own lock file descriptors, cannot take it); folders of tasks no process owns are deleted once untouched for
    the cleanup delay, locked and recent ones are kept."""
    import os
    import time

    import pytest

    from streams.engine import Engine, EngineConfig
    from streams.state_dir import StateDirectory, TaskLocked

    config = EngineConfig(group_id="g", inputs=["impressions"], dead_letter_topic="unused", stage="test",
                          state_dir=tmp_path, state_cleanup_delay_s=60)
    engine = Engine(None, config, make_processor=None)
    other = StateDirectory(tmp_path / "g")  # another worker of the group on this machine
    owned_elsewhere = other.lock(5)
    with pytest.raises(TaskLocked):
        engine.state_directory.lock(5)
    for task in (3, 5, 7):
        store = RocksStore(tmp_path / "g" / str(task))
        store.put("k", {"v": task})
        store.commit(changelog_next=1)
        store.close()
    old = time.time() - 3_600
    for task in (3, 5):  # 3 and 5 untouched for an hour, 7 written just now
        for path in (tmp_path / "g" / str(task)).rglob("*"):
            os.utime(path, (old, old))
        os.utime(tmp_path / "g" / str(task), (old, old))
    assert engine.clean_state_directory() == [3]
    assert not (tmp_path / "g" / "3").exists() and owned_elsewhere.exists() and (tmp_path / "g" / "7").exists()
    assert engine.counts["task state cleaned"] == 1
    other.unlock(5)
    assert engine.state_directory.lock(5) == owned_elsewhere  # released: now this worker may own it
    engine.state_directory.close()
