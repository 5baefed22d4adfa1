"""The prediction logger: every candidate serving showed goes to the prediction-log topic, without ever
blocking or failing a scoring request.

Design
------
- ``log()`` (request threads) encodes the records (``schemas.codec.encode``, key = impression id, Kafka
  timestamp = the record's event time, never later than now), writes them to the journal and appends them to
  a bounded in-memory deque, then wakes the sender: no network I/O, no logging. When the deque is full
  (``serving.log_queue_records``) the records are dropped and counted (``dropped_queue_full``).
- The journal (``<spool_dir>/journal/wal-<n>.jsonl``) is a write-ahead log of what was queued: one ``write``
  per request, no fsync (the page cache outlives the process, so a ``kill -9`` after the response loses
  nothing; a machine crash may lose its last seconds). A segment is deleted once every record in it is done
  (acknowledged, spooled or dropped); the next start moves what an earlier process left in it into the spool.
- One background thread sends the queued records in batches with a kafka-python producer (``acks="all"``,
  idempotent). It waits for every batch to be acknowledged.
  The producer is created lazily, with short timeouts so that a down broker is noticed in seconds, and
  recreated after any failure.
- What Kafka did not acknowledge goes to an append-only spool on disk (``<spool_dir>/seg-<n>.jsonl``, one
  JSON line per record: key, value, headers, timestamp; fsynced per write), bounded by
  ``serving.log_spool_bytes``; over it, records are dropped and counted (``dropped_spool_full``).
  While the spool holds anything, new records are appended to it too (order is kept) and the thread
  retries Kafka with an exponential backoff (0.25 s to 5 s), sending the oldest segment first; a segment is
  deleted only once every record in it is acknowledged.
- ``close()`` flushes while Kafka is up, then writes whatever is still queued to the spool; the next
  start (same spool directory) sends it. A torn last line (a crash in the middle of a write) is cut off
  and counted (``dropped_corrupt``); an unreadable line met later is dropped and counted the same way.
  A spool directory is locked (``flock``) by one logger at a time.
- Records the broker refuses for good (too large, invalid timestamp, corrupt) are dropped and counted
  (``dropped_rejected``) instead of blocking the spool forever. Drops are never silent: they are in
  ``stats()`` and the sender thread logs a warning with the counts (at most every 10 s), as it does when
  Kafka goes down or comes back.

Delivery is at least once: a batch whose acknowledgement was lost (a broker restart, a timeout) is sent
again, and a spool segment that failed half way is sent again in full. Readers drop repeats by
``impression_id`` (the record key). Accounting, at any time::

    logged + recovered == sent + dropped + spooled + queued

where ``recovered`` counts the records found in the spool at start and ``sent`` counts distinct records
(exact at rest; while the sender moves a batch, a concurrent ``stats()`` may see it in two places or none).
``flush()`` waits for ``sent + dropped`` to reach what was logged before it: records leave in log order
(batch by batch, the spool oldest first), so that means every one of them. ``recovered`` includes the journal
of a killed process: those records may have been sent already (at least once).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import orjson

from infra.settings import Settings
from schemas.codec import encode
from schemas.events import PredictionLog

log = logging.getLogger(__name__)

BATCH_RECORDS = 2_000
JOURNAL_SEGMENT_RECORDS = 2_000
SEGMENT_BYTES = 4 * 1024 * 1024
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 5.0
REPORT_EVERY_S = 10.0
# Producer timeouts: a down broker is noticed within a few seconds.
BOOTSTRAP_TIMEOUT_MS = 2_000
MAX_BLOCK_MS = 2_000
REQUEST_TIMEOUT_MS = 3_000
DELIVERY_TIMEOUT_MS = 6_000

# Send outcomes of one record.
ACKED, FAILED, REJECTED = 0, 1, 2
# Broker errors that no retry can fix: the record is dropped (counted) instead of blocking the spool.
PERMANENT_ERRORS = ("MessageSizeTooLargeError", "RecordListTooLargeError", "InvalidTimestampError",
                    "CorruptRecordError", "InvalidRecordError")

Item = tuple[bytes, bytes, list[tuple[str, bytes]], int]  # key, value, headers, timestamp_ms


def to_line(item: Item) -> bytes:
    key, value, headers, ts = item
    return orjson.dumps({"k": key.decode(), "v": value.decode(), "h": [[n, v.decode()] for n, v in headers],
                         "t": ts}) + b"\n"


def from_line(line: bytes) -> Item:
    d = orjson.loads(line)
    return d["k"].encode(), d["v"].encode(), [(n, v.encode()) for n, v in d["h"]], int(d["t"])


class Spool:
    """Append-only segments of JSON lines in one directory, bounded in bytes; thread-safe."""

    def __init__(self, directory: Path, max_bytes: int):
        self.dir, self.max_bytes = Path(directory), max_bytes
        self.segments: dict[int, list[int]] = {}  # seq -> [records, bytes], oldest first
        self.records = self.bytes = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._current: int | None = None
        self._next = 0
        self._lockfd: int | None = None

    def path(self, seq: int) -> Path:
        return self.dir / f"seg-{seq:012d}.jsonl"

    def open(self) -> int:
        """Lock the directory and scan it; return the number of torn lines cut off."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lockfd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            self._lockfd = None
            raise RuntimeError(f"prediction log spool {self.dir} is in use by another logger") from None
        torn = 0
        for p in sorted(self.dir.glob("seg-*.jsonl")):
            seq = int(p.stem.split("-")[1])
            data = p.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                torn += 1
                with open(p, "r+b") as f:
                    f.truncate(cut)
                    os.fsync(f.fileno())
            n = data.count(b"\n", 0, cut)
            if n == 0:
                p.unlink()
                continue
            self.segments[seq] = [n, cut]
            self.records += n
            self.bytes += cut
            self._next = max(self._next, seq + 1)
        return torn

    def append(self, lines: list[bytes]) -> int:
        """Write as many of ``lines`` as fit (in order); return how many were written."""
        with self._lock:
            room, n = self.max_bytes - self.bytes, 0
            for line in lines:
                if len(line) > room:
                    break
                room -= len(line)
                n += 1
            if n == 0:
                return 0
            if self._fd is None or self.segments[self._current][1] >= SEGMENT_BYTES:
                self._rotate()
                self._current, self._next = self._next, self._next + 1
                self._fd = os.open(self.path(self._current), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
                self.segments[self._current] = [0, 0]
            data = b"".join(lines[:n])
            os.write(self._fd, data)
            os.fsync(self._fd)
            seg = self.segments[self._current]
            seg[0] += n
            seg[1] += len(data)
            self.records += n
            self.bytes += len(data)
            return n

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._current = None

    def oldest(self) -> int | None:
        with self._lock:
            return min(self.segments) if self.segments else None

    def read(self, seq: int) -> tuple[list[Item], int]:
        """The records of segment ``seq`` (closed for appends from now on) and the number of unreadable
        lines, which are removed from the segment."""
        with self._lock:
            if seq == self._current:
                self._rotate()
            path = self.path(seq)
            items, bad = [], 0
            good_lines = []
            for line in path.read_bytes().splitlines(keepends=True):
                try:
                    items.append(from_line(line))
                    good_lines.append(line)
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad += 1
            if bad:
                data = b"".join(good_lines)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                seg = self.segments[seq]
                self.records -= seg[0] - len(items)
                self.bytes -= seg[1] - len(data)
                self.segments[seq] = [len(items), len(data)]
            return items, bad

    def remove(self, seq: int) -> None:
        with self._lock:
            if seq == self._current:
                self._rotate()
            n, size = self.segments.pop(seq)
            self.records -= n
            self.bytes -= size
            self.path(seq).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._rotate()
            if self._lockfd is not None:
                os.close(self._lockfd)  # releases the flock
                self._lockfd = None


class Journal:
    """The write-ahead journal of queued records: segments of ``JOURNAL_SEGMENT_RECORDS`` JSON lines, written
    without fsync (a killed process loses nothing; see the module docstring). Callers hold the logger's lock."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.written = 0  # records written, ever (this process)
        self.closed: list[tuple[int, Path]] = []  # (number of the last record, path), oldest first
        self._fd: int | None = None
        self._path: Path | None = None
        self._in_current = 0

    def recover(self) -> tuple[list[bytes], int]:
        """The lines an earlier process left (its torn last lines cut off) and the number of torn lines; call
        :meth:`clear` once they are safe elsewhere."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lines, torn = [], 0
        for path in sorted(self.dir.glob("wal-*.jsonl")):
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            torn += int(cut < len(data))
            lines += data[:cut].splitlines(keepends=True)
        return lines, torn

    def clear(self) -> None:
        """Delete every segment (everything journaled is done)."""
        self._close_current()
        for path in self.dir.glob("wal-*.jsonl"):
            path.unlink(missing_ok=True)
        self.closed = []

    def append(self, lines: list[bytes]) -> None:
        if self._fd is None or self._in_current >= JOURNAL_SEGMENT_RECORDS:
            self._close_current()
            self.dir.mkdir(parents=True, exist_ok=True)
            self._path = self.dir / f"wal-{self.written:015d}.jsonl"
            self._fd = os.open(self._path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.write(self._fd, b"".join(lines))
        self.written += len(lines)
        self._in_current += len(lines)

    def release(self, done: int) -> None:
        """Delete the closed segments whose every record is done (``done`` records, in log order)."""
        while self.closed and self.closed[0][0] <= done:
            self.closed.pop(0)[1].unlink(missing_ok=True)

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self.closed.append((self.written, self._path))
        self._fd, self._path, self._in_current = None, None, 0


class PredictionLogger:
    """Log scored candidates to Kafka in the background; see the module docstring."""

    def __init__(self, settings: Settings, spool_dir: Path | None = None) -> None:
        self.settings = settings
        self.topic = settings.topics.prediction_log
        self.spool = Spool(spool_dir or settings.var_dir / settings.serving.log_spool_subdir,
                           settings.serving.log_spool_bytes)
        self._cap = settings.serving.log_queue_records
        self.journal = Journal(self.spool.dir / "journal")
        self._queue: deque[Item] = deque()
        self._done_records = 0  # queued records done (sent, spooled or dropped), in log order
        self._lock = threading.Lock()
        self._wake, self._nudge, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._producer = None
        self._retired: list = []  # producers whose close must be retried
        self._kafka_up = False
        self._down_since: float | None = None
        self._in_flight = 0
        self._c = dict.fromkeys(("logged", "recovered", "sent", "dropped_queue_full", "dropped_spool_full",
                                 "dropped_corrupt", "dropped_rejected", "dropped_invalid", "send_errors"), 0)
        self._reported_drops, self._reported_at = 0, 0.0

    # -- request side ------------------------------------------------------------------------------
    def log(self, records: Sequence[PredictionLog]) -> None:
        """Encode ``records``, journal them and queue them for sending; never blocks on the network, never
        raises. Over the queue bound the records are dropped and counted."""
        try:
            items, bad = self._encode(records)
            lines = [to_line(i) for i in items]
            with self._lock:
                take = max(0, min(len(items), self._cap - len(self._queue) - self._in_flight))
                if take:
                    self.journal.append(lines[:take])  # under the lock: the journal's order is the queue's
                    self._queue.extend(items[:take])
                self._c["logged"] += len(records)
                self._c["dropped_queue_full"] += len(items) - take
                self._c["dropped_rejected"] += bad
            if take:
                self._wake.set()
        except Exception:  # noqa: BLE001 - logging must never fail a request
            try:
                with self._lock:
                    self._c["dropped_invalid"] += 1
            except Exception:  # noqa: BLE001
                pass

    def stats(self) -> dict[str, int]:
        with self._lock:
            c = dict(self._c)
            queued = len(self._queue) + self._in_flight
        dropped = sum(v for k, v in c.items() if k.startswith("dropped_"))
        return {**c, "dropped": dropped, "queued": queued, "spooled": self.spool.records,
                "spool_bytes": self.spool.bytes, "spool_segments": len(self.spool.segments),
                "kafka_up": int(self._kafka_up)}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> PredictionLogger:
        """Open the spool (what an earlier run left there is sent first) and start the sender thread."""
        if self._thread is not None:
            return self
        torn = self.spool.open()
        lines, torn_journal = self.journal.recover()  # what a killed process had queued: into the spool first
        written = self.spool.append(lines) if lines else 0
        self.journal.clear()
        with self._lock:
            self._c["recovered"] += self.spool.records + len(lines) - written
            self._c["dropped_corrupt"] += torn + torn_journal
            self._c["dropped_spool_full"] += len(lines) - written
        if self.spool.records or torn or torn_journal:
            log.warning("prediction log: %d records in the spool %s from an earlier run, %d of them from its journal "
                        "(%d torn lines dropped)", self.spool.records, self.spool.dir, len(lines), torn + torn_journal)
        self._thread = threading.Thread(target=self._run, name="prediction-logger", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every record logged so far (and every spooled one) is acknowledged or dropped."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            target = self._c["logged"] + self._c["recovered"]
        self._nudge.set()  # retry Kafka now rather than at the end of the backoff
        self._wake.set()
        while True:
            s = self.stats()
            if s["sent"] + s["dropped"] >= target:  # counted only once acknowledged or dropped
                return True
            if time.monotonic() >= deadline or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.02)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the sender; what Kafka has not acknowledged stays in the spool for the next start."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        if self._kafka_up:
            self.flush(timeout_s * 0.5)
        self._stop.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():  # the journal stays: the next start sends what the sender still holds
            log.warning("prediction log: sender still busy at close; spooling the queue from the caller")
            self._queue_to_spool()
        else:
            with self._lock:
                self.journal.clear()  # every record is sent, spooled or dropped
            self.spool.close()
        self._thread = None
        self._report_drops(force=True)

    # -- sender thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        backoff, next_try = 0.0, 0.0
        while not self._stop.is_set():
            self._wake.clear()
            self._report_drops()
            self._retry_close()
            now = time.monotonic()
            due = self._kafka_up or now >= next_try or self._nudge.is_set()
            if not due or self.spool.records:
                self._queue_to_spool()  # keep order: nothing overtakes the spool
            if not due:
                self._wake.wait(min(next_try - now, 1.0))
                continue
            self._nudge.clear()
            try:
                if self.spool.records:
                    ok = self._send_segment()
                elif self._queue:
                    ok = self._send_queue_batch()
                elif not self._kafka_up:
                    ok = self._producer_or_none() is not None
                else:
                    self._wake.wait(1.0)
                    continue
            except Exception:  # noqa: BLE001 - the sender must survive anything
                log.exception("prediction log: unexpected error in the sender")
                ok = False
            if ok:
                backoff = 0.0
                self._mark_up()
            else:
                with self._lock:
                    self._c["send_errors"] += 1
                self._mark_down()
                backoff = min(max(backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)
                next_try = time.monotonic() + backoff
        self._queue_to_spool()
        if self._producer is not None:
            self._close_producer(self._producer)
            self._producer = None
        self._retry_close()
        self.spool.close()

    def _mark_up(self) -> None:
        if not self._kafka_up:
            self._kafka_up = True
            if self._down_since is not None:
                s = self.stats()
                log.warning("prediction log: Kafka is back after %.1f s (spooled %d, sent %d, dropped %d)",
                            time.monotonic() - self._down_since, s["spooled"], s["sent"], s["dropped"])
            self._down_since = None

    def _mark_down(self) -> None:
        if self._producer is not None:
            self._close_producer(self._producer)
            self._producer = None
        if self._kafka_up or self._down_since is None:
            self._kafka_up = False
            self._down_since = time.monotonic()
            s = self.stats()
            log.warning("prediction log: Kafka unavailable at %s; spooling to %s (queued %d, spooled %d, dropped %d)",
                        self.settings.kafka.bootstrap_servers, self.spool.dir, s["queued"], s["spooled"],
                        s["dropped"])

    def _report_drops(self, force: bool = False) -> None:
        s = self.stats()
        now = time.monotonic()
        if s["dropped"] != self._reported_drops and (force or not self._reported_drops
                                                     or now - self._reported_at >= REPORT_EVERY_S):
            log.warning("prediction log: %d records dropped so far (%s)", s["dropped"],
                        ", ".join(f"{k[8:]} {v}" for k, v in s.items() if k.startswith("dropped_") and v))
            self._reported_drops, self._reported_at = s["dropped"], now

    def _take(self, n: int) -> list[Item]:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            self._in_flight += len(batch)
        return batch

    def _done(self, n: int, **counts: int) -> None:
        """``n`` records taken from the queue are done (sent, spooled or dropped): their journal can go."""
        with self._lock:
            self._in_flight -= n
            self._done_records += n
            for k, v in counts.items():
                self._c[k] += v
            self.journal.release(self._done_records)

    def _encode(self, batch: Sequence[PredictionLog]) -> tuple[list[Item], int]:
        """Encoded records and the number that could not be encoded or are too large for the broker."""
        items, bad = [], 0
        now_ms, limit = int(time.time() * 1000), self.settings.kafka.max_record_bytes
        for r in batch:
            try:
                key, value, headers = encode(r)
                if len(key) + len(value) > limit:
                    bad += 1
                    continue
                items.append((key, value, headers, min(int(r.event_time_ms), now_ms)))
            except Exception:  # noqa: BLE001
                bad += 1
        return items, bad

    def _queue_to_spool(self) -> None:
        while items := self._take(BATCH_RECORDS):
            written = self.spool.append([to_line(i) for i in items])
            self._done(len(items), dropped_spool_full=len(items) - written)

    def _send_queue_batch(self) -> bool:
        items = self._take(BATCH_RECORDS)
        status = self._send(items)
        failed = [i for i, s in zip(items, status, strict=True) if s == FAILED]
        written = self.spool.append([to_line(i) for i in failed]) if failed else 0
        self._done(len(items), sent=status.count(ACKED), dropped_rejected=status.count(REJECTED),
                   dropped_spool_full=len(failed) - written)
        return not failed

    def _send_segment(self) -> bool:
        seq = self.spool.oldest()
        if seq is None:
            return True
        items, bad = self.spool.read(seq)
        if bad:
            self._done(0, dropped_corrupt=bad)
        status = self._send(items)
        if FAILED in status:
            return False
        self.spool.remove(seq)  # before counting them sent: flush() returns only once the segment is gone
        self._done(0, sent=status.count(ACKED), dropped_rejected=status.count(REJECTED))
        return True

    def _producer_or_none(self):
        if self._producer is None:
            from kafka import KafkaProducer

            try:
                self._producer = KafkaProducer(
                    **self.settings.kafka.client_config(), client_id="prediction-logger", acks="all",
                    enable_idempotence=True, linger_ms=5, batch_size=256 * 1024,
                    max_request_size=self.settings.kafka.max_record_bytes + 64 * 1024,
                    bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS, max_block_ms=MAX_BLOCK_MS,
                    request_timeout_ms=REQUEST_TIMEOUT_MS, delivery_timeout_ms=DELIVERY_TIMEOUT_MS)
            except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError when no broker answers
                log.debug("prediction log: no producer: %s", exc)
                return None
        return self._producer

    def _send(self, items: list[Item]) -> list[int]:
        """Send ``items`` and wait for the acknowledgements: ACKED, FAILED or REJECTED per item."""
        if not items:
            return []
        producer = self._producer_or_none()
        if producer is None:
            return [FAILED] * len(items)
        from kafka.errors import KafkaError

        futures = []
        try:
            for key, value, headers, ts in items:
                futures.append(producer.send(self.topic, key=key, value=value, headers=headers, timestamp_ms=ts))
        except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError: no metadata within max_block_ms
            log.debug("prediction log: send failed: %s", exc)
        deadline = time.monotonic() + (DELIVERY_TIMEOUT_MS + 3_000) / 1000
        while futures and not all(f.is_done for f in futures) and time.monotonic() < deadline:
            try:
                producer.flush(timeout=max(0.1, deadline - time.monotonic()))
            except KafkaError:
                pass
        status = []
        for f in futures:
            if f.succeeded():
                status.append(ACKED)
            elif f.is_done and type(f.exception).__name__ in PERMANENT_ERRORS:
                log.warning("prediction log: record refused by the broker: %s", f.exception)
                status.append(REJECTED)
            else:
                status.append(FAILED)
        return status + [FAILED] * (len(items) - len(futures))

    def _close_producer(self, producer) -> None:
        try:
            producer.close(timeout=0)
        except Exception:  # noqa: BLE001 - flush timed out on unfinished batches: retried later
            self._retired.append(producer)

    def _retry_close(self) -> None:
        retired, self._retired = self._retired, []
        for p in retired:
            self._close_producer(p)
