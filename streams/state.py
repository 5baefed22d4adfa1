"""State per input partition: a key -> record store with a due-time index and a changelog of its changes.

A processor reads and writes plain JSON-able dicts by key, stored as MessagePack (``encode_record``: about
20 % smaller than JSON, as fast; records written as JSON by an older version are still read). A record may
carry a due time under ``"d"`` (epoch ms): :meth:`due` lists the keys whose due time has passed, so a processor
can close windows without holding an index of every open key in memory. Writes collect in :attr:`pending` until the
runtime has made them durable (a Kafka transaction with the outputs they produced), then :meth:`commit`
applies them to the store; :meth:`changes` gives them as changelog records.

Two implementations with one interface: :class:`MemoryStore` (tests, in-process replays) and
:class:`RocksStore` (the workers: RocksDB through rocksdict, so state larger than memory survives a
restart on local disk and only the changelog's tail is read back).

>>> s = MemoryStore()
>>> s.put("a", {"d": 5, "x": 1}); s.put("b", {"d": 9})
>>> s.due(6)
['a']
>>> s.delete("a"); s.due(100)
['b']
"""

from __future__ import annotations

import heapq
import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec
import orjson

META = "\x00meta/"  # keys of the processor's own bookkeeping (clocks), changelogged like records
_NO_DUE = -1


def rocksdb_options(raw_mode: bool = False):
    """RocksDB options for every local store of the project (state, the trainer's stores), sized as Kafka Streams
    sizes its stores: 16 MB write buffers, at most 3 (the default, 64 MB, holds up to 128 MB of memtables per
    store: a worker has one store per task); and files with many deletions (state expires) are compacted soon,
    so deleted records do not stay on disk until size-triggered compaction reaches them (``make soak``)."""
    from rocksdict import Options

    opts = Options(raw_mode=raw_mode)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(16 << 20)
    opts.set_max_write_buffer_number(3)
    opts.add_compact_on_deletion_collector_factory(10_000, 5_000, 0.5)
    return opts


def keys_with_prefix(db, prefix: str) -> list[str]:
    """The keys of a dict or a (non-raw) ``Rdict`` that start with ``prefix``, in order (a range scan on RocksDB)."""
    if isinstance(db, dict):
        return sorted(k for k in db if k.startswith(prefix))
    out = []
    for key in db.keys(from_key=prefix):
        if not key.startswith(prefix):
            break
        out.append(key)
    return out


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode_record(record: dict) -> bytes:
    """A state record as stored and changelogged (MessagePack)."""
    return _encoder.encode(record)


def decode_record(raw: bytes) -> dict:
    """A stored or changelogged record: MessagePack, or JSON from before (a JSON object starts with ``{``, which
    MessagePack spends on the integer 123, never a record)."""
    return orjson.loads(raw) if raw[:1] == b"{" else _decoder.decode(raw)


def _due_of(record: dict | None) -> int:
    return _NO_DUE if record is None else record.get("d", _NO_DUE)


class Store:
    """The interface a processor uses; subclasses keep the committed records."""

    def __init__(self) -> None:
        self.pending: dict[str, dict | None] = {}
        self._encoded: dict[str, bytes | None] | None = None  # the pending changes as changes() encoded them

    # -- committed records (subclasses) -------------------------------------------------------------------
    def _committed(self, key: str) -> dict | None:
        raise NotImplementedError

    def _committed_due(self, upto_ms: int) -> Iterator[tuple[int, str]]:
        raise NotImplementedError

    def _apply(self, changes: dict[str, dict | None], changelog_next: int | None,
               encoded: dict[str, bytes | None] | None = None) -> None:
        """Make ``changes`` the committed records; ``encoded``: the same changes already encoded, when known."""
        raise NotImplementedError

    # -- reads and writes -----------------------------------------------------------------------------------
    def get(self, key: str) -> dict | None:
        if key in self.pending:
            return self.pending[key]
        return self._committed(key)

    def put(self, key: str, record: dict) -> None:
        self.pending[key] = record
        self._encoded = None

    def delete(self, key: str) -> None:
        self.pending[key] = None
        self._encoded = None

    def due(self, upto_ms: int) -> list[str]:
        """Keys that were due before ``upto_ms``, earliest first. The index is cleaned lazily: a key may come
        with a due time its record no longer has (check the record's ``"d"``); every key returned must be
        deleted or given a later due time before the next commit."""
        found: list[tuple[int, str]] = []
        for d, key in self._committed_due(upto_ms):
            if key in self.pending:
                continue  # its pending version decides
            found.append((d, key))
        for key, record in self.pending.items():
            d = _due_of(record)
            if d != _NO_DUE and d < upto_ms:
                found.append((d, key))
        found.sort()
        return list(dict.fromkeys(key for _, key in found))

    # -- durability -----------------------------------------------------------------------------------------
    def changes(self) -> list[tuple[bytes, bytes | None]]:
        """The pending changes as changelog records (key, encoded value or None for a deletion); each record is
        encoded once: :meth:`commit` stores the same bytes."""
        encoded = {k: None if v is None else encode_record(v) for k, v in self.pending.items()}
        self._encoded = encoded
        return [(k.encode(), v) for k, v in encoded.items()]

    def commit(self, changelog_next: int | None = None) -> None:
        """Apply the pending changes (once they are durable); remember the changelog position."""
        if self.pending:
            self._apply(self.pending, changelog_next, self._encoded)
            self.pending, self._encoded = {}, None
        elif changelog_next is not None:
            self._apply({}, changelog_next)

    def rollback(self) -> None:
        """Forget the pending changes (their transaction was aborted)."""
        self.pending, self._encoded = {}, None
        self._low = 0

    def restore(self, records: list[tuple[bytes, bytes | None]], changelog_next: int) -> None:
        """Apply changelog records read back from Kafka (recovery); the last change of a key counts."""
        raw = {k.decode(): v for k, v in records}
        changes = {k: None if v is None else decode_record(v) for k, v in raw.items()}
        self._apply(changes, changelog_next, raw)

    @property
    def changelog_next(self) -> int | None:
        """The changelog offset after the last change this store holds (None: nothing restored yet)."""
        return None

    def close(self) -> None:
        pass


class MemoryStore(Store):
    """Records in a dict, due times in a heap (with lazy deletion)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict] = {}
        self._heap: list[tuple[int, str]] = []
        self._next: int | None = None
        self._low = 0

    def _committed(self, key: str) -> dict | None:
        return self.records.get(key)

    def _committed_due(self, upto_ms: int) -> Iterator[tuple[int, str]]:
        """Pops what it yields: a processor deletes or re-schedules every due key it is given."""
        heap = self._heap
        while heap and heap[0][0] < upto_ms:
            d, key = heapq.heappop(heap)
            if _due_of(self.records.get(key)) == d:  # else stale: the record moved on or is gone
                yield d, key

    def _apply(self, changes: dict[str, dict | None], changelog_next: int | None,
               encoded: dict[str, bytes | None] | None = None) -> None:
        for key, record in changes.items():
            if record is None:
                self.records.pop(key, None)
            else:
                self.records[key] = record
                if (d := _due_of(record)) != _NO_DUE:
                    heapq.heappush(self._heap, (d, key))
        if changelog_next is not None:
            self._next = changelog_next

    @property
    def changelog_next(self) -> int | None:
        return self._next

    def __len__(self) -> int:
        return len(self.records)


class RocksStore(Store):
    """Records and a due index in one RocksDB database per partition (rocksdict).

    Layout: ``r<key>`` -> the record (``encode_record``); ``d<due ms, 13 digits><key>`` -> b"" (sorted by due time);
    ``m/changelog_next`` -> the changelog offset after the last change applied. The three are written
    in one atomic write batch per commit. A record's old due key is not looked up and deleted when the
    record changes (that would cost a read per change): due keys are deleted once the clock has passed
    them (see :meth:`Store.due`)."""

    def __init__(self, path: Path):
        from rocksdict import Rdict

        super().__init__()
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = Rdict(str(path), options=rocksdb_options(raw_mode=True))
        self._low = 0  # the due index holds nothing committed before this (see _committed_due)
        self._resolved: list[bytes] = []  # due keys handed out since the last commit

    def _committed(self, key: str) -> dict | None:
        raw = self.db.get(b"r" + key.encode())
        return None if raw is None else decode_record(raw)

    def _committed_due(self, upto_ms: int) -> Iterator[tuple[int, str]]:
        """Due keys from the low-water mark on: every key it yields is resolved (its record deleted or
        re-scheduled later) before the next commit, which deletes those due keys; so nothing committed stays
        due before the last ``upto_ms``, and starting there skips the tombstones of deleted due keys, which
        RocksDB would otherwise walk through on every call."""
        start = b"d%013d" % self._low
        end = b"d%013d" % max(upto_ms, 0)
        for k in self.db.keys(from_key=start):
            if k >= end or not k.startswith(b"d"):
                break
            self._resolved.append(k)
            yield int(k[1:14]), k[14:].decode()
        self._low = max(self._low, upto_ms)

    def _apply(self, changes: dict[str, dict | None], changelog_next: int | None,
               encoded: dict[str, bytes | None] | None = None) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for k in self._resolved:
            wb.delete(k)
        self._resolved = []
        for key, record in changes.items():
            kb = b"r" + key.encode()
            if record is None:
                wb.delete(kb)
            else:
                wb.put(kb, encoded[key] if encoded is not None else encode_record(record))
                if (d := record.get("d", _NO_DUE)) != _NO_DUE:
                    wb.put(b"d%013d" % d + kb[1:], b"")
        if changelog_next is not None:
            wb.put(b"m/changelog_next", str(changelog_next).encode())
        self.db.write(wb)

    @property
    def changelog_next(self) -> int | None:
        raw = self.db.get(b"m/changelog_next")
        return None if raw is None else int(raw)

    def count(self) -> int:
        """Records held (a full scan of the record keys: for reports and tests, not the hot path)."""
        n = 0
        for k in self.db.keys(from_key=b"r"):
            if not k.startswith(b"r"):
                break
            n += 1
        return n

    def close(self) -> None:
        self.db.close()

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
