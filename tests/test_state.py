"""The RocksDB task store: commit, due index, reopen and restore from changelog records (no broker)."""

from __future__ import annotations

from streams.state import MemoryStore, RocksStore


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
