"""The batched stream engine every always-on processor runs on: exactly once, state per partition on disk.

Input: co-partitioned topics (partition p of each input is one *task*, owned by one worker at a time),
read by an aiokafka consumer group (``read_committed``) in whole fetched batches. A processor is plain
Python per task: it gets the task's records of a batch, in arrival order, and writes outputs to an
:class:`Outbox` and state to a :class:`streams.state.Store`.

Checkpoint, per task and batch (as Kafka Streams' exactly-once and Quix Streams do it): in one Kafka
transaction of the task's own transactional producer (``<group>-<p>``), the outputs, the state
changes (changelog topic ``<group>-changelog``, partition p) and the input offsets
(``send_offsets_to_transaction``); once committed, the changes are written to the task's local
RocksDB together with the changelog offset they reach. So a crash at any point leaves the committed
offsets, outputs and changelog consistent (readers use ``read_committed``); a restart opens the local
store, reads the changelog from the offset it records to the end, and resumes from the committed
offsets. A worker that lost its partitions while stalled (a zombie) is fenced by the new owner's
producer and cannot commit. Each task also tracks the next offset it must process per input (its committed
offset when it opened, then the end of each batch): a fetch answered for an earlier assignment can still be
handed out after a rebalance reopened the task, and its records below that offset are already in the
restored state, so they are skipped (counted as ``stale records skipped``), never applied twice. No private
attribute of aiokafka or faust is used.

Idleness, per input partition: read to its end (the consumer's position at the last stable offset,
from a fetch answered in the last few seconds) and no record for ``idle_timeout_s``. Processors use it
to keep a quiet input from holding their clocks back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord

from infra.settings import Settings
from streams.dead_letter import make_dead_letter
from streams.state import RocksStore, Store
from streams.state_dir import StateDirectory, TaskLocked

log = logging.getLogger(__name__)
Headers = list[tuple[str, bytes]]


@dataclass
class Outbox:
    """Records a processor wants written, in order: (topic, key, value, headers, partition or None)."""

    records: list[tuple[str, bytes | None, bytes | None, Headers, int | None]] = field(default_factory=list)

    def add(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
            partition: int | None = None) -> None:
        self.records.append((topic, key, value, headers or [], partition))

    def __len__(self) -> int:
        return len(self.records)


class Processor(Protocol):
    """The per-task logic: pure Python, driven by the engine (or by a test without Kafka)."""

    counts: Counter

    def process(self, records: list[ConsumerRecord], out: Outbox) -> None:
        """Handle one batch of this task's input records (all inputs, in arrival order)."""

    def advance(self, idle_topics: set[str], wall_ms: int, out: Outbox) -> None:
        """Let time pass: close what is due. ``idle_topics``: inputs read to their end and quiet."""


@dataclass
class EngineConfig:
    group_id: str
    inputs: list[str]
    dead_letter_topic: str
    stage: str
    state_dir: Path
    max_records: int = 20_000
    poll_ms: int = 20
    # While catching up, a transaction spans the batches fetched in this long (Kafka Streams'
    # commit.interval.ms); once caught up, every fetch is committed at once (outputs visible sooner).
    commit_interval_s: float = 0.05
    idle_timeout_s: float = 10.0
    # A record over this many bytes is not written; a truncated dead letter says what it was.
    max_record_bytes: int = 1_000_000
    transaction_timeout_ms: int = 120_000
    # Folders of tasks no process owns are deleted once untouched this long (Kafka Streams' state.cleanup.delay.ms).
    state_cleanup_delay_s: float = 600.0
    # How long to wait for another process on this machine (a fenced zombie closing) to release a task's lock.
    task_lock_wait_s: float = 60.0

    @property
    def changelog_topic(self) -> str:
        return f"{self.group_id}-changelog"


class Task:
    """Partition p of every input: its store, processor and transactional producer."""

    def __init__(self, partition: int, store: Store, processor: Processor, producer: AIOKafkaProducer):
        self.partition = partition
        self.store = store
        self.processor = processor
        self.producer = producer
        self.outbox = Outbox()
        self.offsets: dict[TopicPartition, int] = {}  # next offset to commit, per input partition
        self.position: dict[TopicPartition, int] = {}  # next offset to process (from the committed offset on)
        self.dirty = False
        self.last_record_wall: dict[str, float] = {}
        self.opened_wall = time.monotonic()


class Engine:
    """Runs processors over a consumer group; see the module docstring for the protocol."""

    def __init__(self, settings: Settings, config: EngineConfig,
                 make_processor: Callable[[int, Store], Processor]):
        self.settings = settings
        self.config = config
        self.make_processor = make_processor
        self.tasks: dict[int, Task] = {}
        self.counts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # events, batches, process_s, commit_s since the last report
        self.consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._last_commit = time.perf_counter()
        self.state_directory = StateDirectory(config.state_dir / config.group_id)

    # -- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        from infra.topics import ensure_changelog

        ensure_changelog(self.settings, self.config.changelog_topic, self.config.inputs)
        self.consumer = AIOKafkaConsumer(
            **self.settings.kafka.aiokafka_config(), group_id=self.config.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed", max_poll_records=self.config.max_records,
            fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=10_000, heartbeat_interval_ms=2_000, max_poll_interval_ms=600_000,
            partition_assignment_strategy=(_range_assignor(),))
        self.consumer.subscribe(self.config.inputs, listener=_Listener(self))
        await self.consumer.start()
        log.info("%s: consumer group %s started on %s", self.config.stage, self.config.group_id, self.config.inputs)

    async def run(self) -> None:
        """Fetch -> process -> checkpoint, until :meth:`stop`."""
        assert self.consumer is not None, "start() first"
        idle: dict[int, set[str]] = {}
        checked = 0.0
        while not self._stopping:
            batch = await self.consumer.getmany(timeout_ms=self.config.poll_ms, max_records=self.config.max_records)
            if time.monotonic() - checked >= 1.0:  # idleness is a matter of seconds: look once a second
                idle, checked = await self._idle_inputs(), time.monotonic()
            async with self._lock:
                if self._stopping:
                    break  # not processed, not committed: the next owner reads it again
                await self._step(batch, idle)

    async def stop(self) -> None:
        """Finish the batch in hand (its transaction commits), close the tasks, leave the group."""
        self._stopping = True
        async with self._lock:
            await self._checkpoint_all()
            for p in list(self.tasks):
                await self._close_task(p)
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    # -- one step -------------------------------------------------------------------------------------------
    async def _step(self, batch: dict[TopicPartition, list[ConsumerRecord]], idle: dict[int, set[str]]) -> None:
        started = time.perf_counter()
        by_task: dict[int, list[ConsumerRecord]] = defaultdict(list)
        now = time.monotonic()
        for tp, records in batch.items():
            task = self.tasks.get(tp.partition)
            if task is None or not records:
                continue  # revoked meanwhile: not ours to process
            start = task.position.get(tp)
            if start is not None and records[0].offset < start:
                # Fetched before the task was (re)opened at its committed offset: already in its state.
                stale = sum(1 for r in records if r.offset < start)
                self.counts["stale records skipped"] += stale
                log.warning("%s: task %d skipped %d records of %s fetched before it was opened at offset %d",
                            self.config.stage, tp.partition, stale, tp, start)
                records = records[stale:]
                if not records:
                    continue
            by_task[tp.partition].extend(records)
            task.offsets[tp] = task.position[tp] = records[-1].offset + 1
            task.last_record_wall[tp.topic] = now
        n = 0
        for p, records in by_task.items():
            task = self.tasks[p]
            records.sort(key=_arrival)
            task.processor.process(records, task.outbox)
            task.dirty = True
            n += len(records)
        wall_ms = int(time.time() * 1000)
        for p, task in self.tasks.items():
            task.processor.advance(idle.get(p, set()), wall_ms, task.outbox)
        processed = time.perf_counter()
        committed = 0
        # Caught up (a short fetch): commit now, latency matters more than amortizing the transaction.
        caught_up = n < self.config.max_records // 4
        if caught_up or processed - self._last_commit >= self.config.commit_interval_s:
            committed = await self._checkpoint_all()
            self._last_commit = time.perf_counter()
        if n or committed:
            self.stats.update(events=n, batches=1, commits=committed, process_s=processed - started,
                              commit_s=time.perf_counter() - processed)

    async def _checkpoint_all(self) -> int:
        """Commit every task with uncommitted work, concurrently; return how many."""
        dirty = [t for t in self.tasks.values() if t.dirty or t.outbox.records or t.store.pending]
        if dirty:
            await asyncio.gather(*(self._checkpoint(t) for t in dirty))
        return len(dirty)

    async def _idle_inputs(self) -> dict[int, set[str]]:
        """Per task, the inputs read to their end (from a fetch answered in the last 5 s) and quiet."""
        idle: dict[int, set[str]] = {}
        now = time.monotonic()
        for p, task in list(self.tasks.items()):
            for topic in self.config.inputs:
                if now - task.last_record_wall.get(topic, task.opened_wall) < self.config.idle_timeout_s:
                    continue
                tp = TopicPartition(topic, p)
                try:
                    end = self.consumer.last_stable_offset(tp)
                    polled = self.consumer.last_poll_timestamp(tp)
                    if end is None or polled is None or time.time() * 1000 - polled > 5_000:
                        continue  # no recent answer from the broker: not known to be at the end
                    if await self.consumer.position(tp) >= end:
                        idle.setdefault(p, set()).add(topic)
                except Exception:  # reassigned meanwhile
                    continue
        return idle

    async def _checkpoint(self, task: Task) -> None:
        """Outputs, changelog and input offsets in one transaction; then the local store."""
        producer, p = task.producer, task.partition
        records, task.outbox = task.outbox.records, Outbox()
        changes = task.store.changes()
        try:
            await producer.begin_transaction()
            futures = await self._send(producer, p, records)
            changelog = await self._send_batches(producer, self.config.changelog_topic, p,
                                                 [(k, v, []) for k, v in changes]) if changes else []
            if task.offsets:
                await producer.send_offsets_to_transaction(dict(task.offsets), self.config.group_id)
            await asyncio.gather(*futures, *(f for f, _ in changelog))
            await producer.commit_transaction()
        except Exception:
            _die(f"{self.config.stage}: task {p} could not commit its transaction (nothing of it is visible to "
                 "read_committed readers)")
        changelog_next = None
        if changelog:
            last, n = changelog[-1]
            changelog_next = last.result().offset + n  # the batch's base offset + its records
        task.store.commit(changelog_next)
        task.offsets.clear()
        task.dirty = False
        self.counts["records written"] += len(records)
        self.counts["state changes"] += len(changes)

    async def _send(self, producer: AIOKafkaProducer, p: int, records) -> list[asyncio.Future]:
        """One record batch per topic partition (aiokafka's per-record send costs a future per record).

        A record without a partition goes, in a topic with as many partitions as the inputs, to the task's
        own partition p: the inputs are co-partitioned by the same key, so that is where Kafka's default
        partitioner (murmur2 of the key) would put it, without hashing each key in Python."""
        by_tp: dict[tuple[str, int], list] = defaultdict(list)
        n_inputs = len(await self._partitions_of(producer, self.config.inputs[0]))
        parts_of = {topic: await self._partitions_of(producer, topic) for topic in {r[0] for r in records}}
        limit = self.config.max_record_bytes
        for topic, key, value, headers, partition in records:
            if value is not None and len(value) > limit:
                topic, key, value, headers = self._too_large(topic, key, value)
                partition = None
                parts_of.setdefault(topic, await self._partitions_of(producer, topic))
            if partition is None:
                parts = parts_of[topic]
                partition = p if len(parts) == n_inputs else self._partitioner(key, parts, parts)
            by_tp[(topic, partition)].append((key, value, headers))
        futures = []
        for (topic, partition), recs in by_tp.items():
            futures += [f for f, _ in await self._send_batches(producer, topic, partition, recs)]
        return futures

    @staticmethod
    async def _send_batches(producer: AIOKafkaProducer, topic: str, partition: int,
                            recs) -> list[tuple[asyncio.Future, int]]:
        """Send ``recs`` as record batches; return each batch's future with its number of records."""
        sent, batch, size = [], producer.create_batch(), 0
        for key, value, headers in recs:
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                sent.append((await producer.send_batch(batch, topic, partition=partition), size))
                batch, size = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a record for {topic} does not fit an empty batch")
            size += 1
        sent.append((await producer.send_batch(batch, topic, partition=partition), size))
        return sent

    def _too_large(self, topic: str, key: bytes | None, value: bytes) -> tuple[str, bytes, bytes, Headers]:
        from schemas.codec import encode

        self.counts["output too large"] += 1
        dead = make_dead_letter(topic, -1, -1, self.config.stage,
                                f"output too large: {len(value):,} bytes > {self.config.max_record_bytes:,}", value,
                                max_payload=min(64 * 1024, self.config.max_record_bytes // 5))
        k, v, h = encode(dead)
        return self.config.dead_letter_topic, k, v, h

    async def _partitions_of(self, producer: AIOKafkaProducer, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(await producer.partitions_for(topic))
        return self._partitions[topic]

    # -- assignment -----------------------------------------------------------------------------------------
    async def _open_task(self, p: int) -> None:
        """Fence any previous owner, restore the state from the changelog tail, seek to committed offsets."""
        producer = AIOKafkaProducer(**self.settings.kafka.aiokafka_config(),
                                    transactional_id=f"{self.config.group_id}-{p}", enable_idempotence=True,
                                    acks="all", linger_ms=0,
                                    max_batch_size=1024 * 1024, max_request_size=4 * 1024 * 1024,
                                    transaction_timeout_ms=self.config.transaction_timeout_ms,
                                    request_timeout_ms=120_000)
        await producer.start()  # InitProducerId: a zombie with the same id is fenced, its open transaction aborted
        store = await self.restore_task(p, RocksStore(await self._lock_task(p)))
        assert self.consumer is not None
        task = Task(p, store, self.make_processor(p, store), producer)
        for topic in self.config.inputs:
            tp = TopicPartition(topic, p)
            committed = await self.consumer.committed(tp)
            if committed is None:
                # An explicit offset: seek_to_beginning right after an assignment can land at the end
                # (seen with aiokafka 0.14 on a manually assigned changelog partition).
                committed = (await self.consumer.beginning_offsets([tp]))[tp]
            self.consumer.seek(tp, committed)
            task.position[tp] = committed
        self.tasks[p] = task

    async def restore_task(self, p: int, store: RocksStore) -> RocksStore:
        """Bring the task's local store up to the changelog's end; return the store to use. A local checkpoint
        outside the changelog's offsets (a re-created, truncated or deleted-from topic) is not trusted: the local
        state is wiped and the whole changelog restored, as Kafka Streams does."""
        tp = TopicPartition(self.config.changelog_topic, p)
        restorer = AIOKafkaConsumer(**self.settings.kafka.aiokafka_config(), group_id=None,
                                    enable_auto_commit=False, isolation_level="read_committed",
                                    auto_offset_reset="earliest", max_poll_records=50_000,
                                    fetch_max_bytes=32 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
        await restorer.start()
        try:
            restorer.assign([tp])
            end = (await restorer.end_offsets([tp]))[tp]
            beginning = (await restorer.beginning_offsets([tp]))[tp]
            start = store.changelog_next
            if start is not None and not beginning <= start <= end:
                log.warning("%s: task %d's local state is at changelog offset %d, outside the changelog's %d..%d: "
                            "wiping it and restoring the whole changelog", self.config.stage, p, start, beginning, end)
                self.counts["local state wiped"] += 1
                path = store.path
                store.destroy()
                store, start = RocksStore(path), None
            if start is None:  # no local state: the whole changelog (an explicit offset, see _open_task)
                start = beginning
            restorer.seek(tp, start)
            t0, n, last_log = time.monotonic(), 0, time.monotonic()
            while (position := await restorer.position(tp)) < end:
                batch = await restorer.getmany(tp, timeout_ms=500, max_records=50_000)
                records = batch.get(tp, [])
                if records:
                    store.restore([(r.key, r.value) for r in records], records[-1].offset + 1)
                    n += len(records)
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    log.info("%s: task %d restoring: %d of %d changelog records", self.config.stage, p,
                             position - start, end - start)
            store.commit(end)  # control records (transaction markers) may follow the last change
            log.info("%s: task %d restored %d changelog records (offsets %d..%d) in %.1f s", self.config.stage, p,
                     n, start, end, time.monotonic() - t0)
        finally:
            await restorer.stop()
        return store

    async def _lock_task(self, p: int) -> Path:
        """The task's state folder, once this process holds its lock (another process may still be closing it)."""
        deadline = time.monotonic() + self.config.task_lock_wait_s
        while True:
            try:
                return self.state_directory.lock(p)
            except TaskLocked:
                if time.monotonic() > deadline:
                    raise
                log.info("%s: task %d's state is locked by another process here; waiting", self.config.stage, p)
                await asyncio.sleep(0.5)

    async def _close_task(self, p: int) -> None:
        task = self.tasks.pop(p, None)
        if task is None:
            return
        try:
            await task.producer.stop()
        finally:
            task.store.close()
            self.state_directory.unlock(p)

    def clean_state_directory(self) -> list[int]:
        """Delete the local state of tasks no process owns (untouched for ``state_cleanup_delay_s``)."""
        cleaned = self.state_directory.clean_unowned(set(self.tasks), self.config.state_cleanup_delay_s)
        if cleaned:
            self.counts["task state cleaned"] += len(cleaned)
            log.info("%s: deleted the local state of unowned tasks %s", self.config.stage, cleaned)
        return cleaned

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # the batch in hand is finished first
            await self._checkpoint_all()
            for p in sorted({tp.partition for tp in revoked}):
                await self._close_task(p)
            if revoked:
                log.info("%s: revoked tasks %s", self.config.stage, sorted({tp.partition for tp in revoked}))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            for p in sorted({tp.partition for tp in assigned} - set(self.tasks)):
                await self._open_task(p)
            log.info("%s: owns tasks %s", self.config.stage, sorted(self.tasks))
            self.clean_state_directory()

    # -- reporting ------------------------------------------------------------------------------------------
    def report(self) -> str:
        s, b = self.stats, max(self.stats["batches"], 1)
        line = (f"{s['events']} events in {s['batches']} batches, {s['commits']} task commits (process "
                f"{1000 * s['process_s'] / b:.1f} ms, commit {1000 * s['commit_s'] / b:.1f} ms per batch); "
                f"tasks {sorted(self.tasks)}")
        self.stats.clear()
        return line


def _arrival(record: ConsumerRecord) -> int:
    return record.timestamp


def _range_assignor():
    """Partition p of every input to the same worker (co-partitioned tasks): Kafka's range assignor."""
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor

    return RangePartitionAssignor


class _Listener(ConsumerRebalanceListener):
    def __init__(self, engine: Engine):
        self.engine = engine

    # aiokafka logs and swallows a listener's exception, which would leave a worker in the group owning
    # partitions it does not process: a failure here ends the process instead (a restart retries).
    async def on_partitions_revoked(self, revoked) -> None:
        try:
            await self.engine.on_revoked(set(revoked))
        except Exception:
            _die(f"{self.engine.config.stage}: could not hand over revoked partitions")

    async def on_partitions_assigned(self, assigned) -> None:
        try:
            await self.engine.on_assigned(set(assigned))
        except Exception:
            _die(f"{self.engine.config.stage}: could not open the assigned tasks")


def _die(message: str) -> None:
    """End the process now: nothing uncommitted is visible, and a restart resumes from the committed state."""
    log.critical("%s; exiting (a restart resumes from the last committed state)", message, exc_info=True)
    logging.shutdown()
    os._exit(70)
