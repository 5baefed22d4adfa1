"""The joiner's state as a faust table, written to the changelog partition that owns each key.

faust writes a table change to the partition of the event being processed, which is wrong when a timer
(no event) or an event of another key finishes an entry. Every entry here carries its partition
(``entry["p"]``, the partition of the impression's events), and changes go to exactly that partition of
the changelog, so a restarted or rebalanced worker recovers each entry with its input partition.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping


class FaustState(MutableMapping):
    def __init__(self, table):
        self.table = table

    def __getitem__(self, key: str) -> dict:
        return self.table.data[key]

    def get(self, key: str, default=None):
        return self.table.data.get(key, default)

    def __setitem__(self, key: str, entry: dict) -> None:
        self.table.data[key] = entry
        self.table.send_changelog(entry["p"], key, entry)

    def __delitem__(self, key: str) -> None:
        entry = self.table.data.pop(key)
        self.table.send_changelog(entry["p"], key, None, value_serializer="raw")

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.data)

    def __len__(self) -> int:
        return len(self.table.data)
