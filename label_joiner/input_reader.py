"""Reads input messages the stream runtime did not deliver, straight from Kafka.

faust drops a fetched message without acknowledging it when it arrives while flow control is paused
or from an older consumer generation (around start-up and rebalances), counting on a seek to fetch it
again; and its commit logic (``Consumer._new_offset``) can then commit past such a one-message gap. The
message would be lost. The joiner therefore tracks the next offset of every input partition in its
own state (``LabelJoiner.position``) and, when faust hands it a message beyond that, reads the missing
range here and joins it first.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.settings import Settings


class InputReader:
    def __init__(self, settings: Settings, group_id: str):
        self._config = dict(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=group_id,
                            enable_auto_commit=False, auto_offset_reset="earliest",
                            client_id=f"{group_id}-input-reader")
        self._consumer: AIOKafkaConsumer | None = None  # never subscribes: it does not join the group
        self._lock = asyncio.Lock()

    async def _ready(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self._config)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        async with self._lock:
            if self._consumer is not None:
                await self._consumer.stop()
                self._consumer = None

    async def start_offset(self, topic: str, partition: int) -> int:
        """Where the worker's input starts when its state has no position yet: the group's committed
        offset, or the beginning of the log for a new group (faust's ``earliest``)."""
        async with self._lock:
            consumer = await self._ready()
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            committed = await consumer.committed(tp)
            if committed is not None:
                return committed
            return (await consumer.beginning_offsets([tp]))[tp]

    async def end_offsets(self, topics: list[str], partitions: list[int]) -> dict[tuple[str, int], int]:
        """The log-end offset of every (topic, partition); raises when the broker cannot be reached."""
        async with self._lock:
            consumer = await self._ready()
            tps = [TopicPartition(t, p) for t in topics for p in partitions]
            ends = await consumer.end_offsets(tps)
            return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def read(self, topic: str, partition: int, start: int, end: int, timeout_s: float = 30.0) -> list:
        """The messages with ``start`` <= offset < ``end`` (fewer where the log has no such offset)."""
        async with self._lock:
            consumer = await self._ready()
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            found, deadline = [], asyncio.get_running_loop().time() + timeout_s
            while await consumer.position(tp) < end:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"could not read {topic}[{partition}] offsets {start}..{end - 1}")
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=end - start)
                found += [m for m in batch.get(tp, []) if m.offset < end]
            return found
