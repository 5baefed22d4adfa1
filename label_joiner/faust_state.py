"""The joiner's state as a faust table, with changelog writes held back until the outputs are durable.

Two rules make restarts lose nothing:

* every change goes to the changelog partition that owns the key (``entry["p"]``, the partition of the
  impression's events), not to the partition of whatever event or timer caused it, so a restarted or
  rebalanced worker recovers each entry with its input partition;
* changes are written only by :meth:`FaustState.write_changelog`, which the worker calls after it has
  flushed the outputs those changes account for, and the worker flushes the changelog before faust may
  commit the input offsets. A crash can then lose state (the events are replayed and the outputs sent
  again: at least once) but never record an output as sent that was not, nor skip an event.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import orjson

from label_joiner.sink import KafkaSink


class FaustState(MutableMapping):
    def __init__(self, table):
        self.table = table
        self.pending: dict[str, tuple[int, dict | None]] = {}

    @property
    def _entries(self) -> dict:
        """The memory store's own dict: faust's Store wraps each read in several Python-level calls, which
        cost more than the join's own work per event. Recovery fills this same dict."""
        return self.table.data.data

    def __getitem__(self, key: str) -> dict:
        return self._entries[key]

    def get(self, key: str, default=None):
        return self._entries.get(key, default)

    def __setitem__(self, key: str, entry: dict) -> None:
        self._entries[key] = entry
        self.pending.pop(key, None)  # re-insert: changes are written in the order of their last update
        self.pending[key] = (entry["p"], entry)

    def __delitem__(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.pending.pop(key, None)
        self.pending[key] = (entry["p"], None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def retain(self, partitions: set[int]) -> int:
        """Forget (locally, without writing the changelog) every entry of a partition not in
        ``partitions``: after a rebalance their owner is another worker. Return how many."""
        gone = [k for k, e in self._entries.items() if e["p"] not in partitions]
        for key in gone:
            del self._entries[key]
            self.pending.pop(key, None)
        return len(gone)

    def write_changelog(self, sink: KafkaSink) -> int:
        """Hand the pending changes (the last one per key) to ``sink``; return how many.

        Keys and values are JSON, as the table's ``json`` serializers read them back at recovery; a
        deleted key is a tombstone."""
        pending, self.pending = self.pending, {}
        topic = self.table.changelog_topic.get_topic_name()
        for key, (partition, entry) in pending.items():
            value = None if entry is None else orjson.dumps(entry)
            sink.add(topic, orjson.dumps(key), value, partition=partition)
        return len(pending)
