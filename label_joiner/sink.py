"""Everything the joiner writes, collected per batch and sent as record batches by one aiokafka producer.

faust's send path costs tens of microseconds per message (a FutureMessage, callbacks, a send buffer its
flush does not reliably drain), and so does aiokafka's per-record ``send`` (a future per record). The
join writes several records per input event, so the worker collects them here with :meth:`KafkaSink.add`
(a list append) and :meth:`KafkaSink.flush` builds one record batch per topic partition, hands them to
the producer and waits until the broker has acknowledged every one (acks=all, idempotent producer),
raising if any failed: the worker never records progress for an output that was not written.
Records without an explicit partition go where Kafka's default partitioner (murmur2 of the key) puts
them, as any Kafka client would.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from infra.settings import Settings

Headers = list[tuple[str, bytes]]
Record = tuple[bytes | None, bytes | None, Headers | None]


class DeliveryFailed(RuntimeError):
    """A batch the sink sent was not acknowledged; the worker must not commit past it."""


class KafkaSink:
    def __init__(self, settings: Settings, client_id: str = "label-joiner-sink"):
        self._config = dict(bootstrap_servers=settings.kafka.bootstrap_servers, client_id=client_id, acks="all",
                            enable_idempotence=True, linger_ms=0, max_batch_size=1024 * 1024,
                            max_request_size=4 * 1024 * 1024,
                            # A batch is retried this long (e.g. across a broker restart) before it fails.
                            request_timeout_ms=120_000)
        self._producer: AIOKafkaProducer | None = None  # created in the worker's event loop
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._records: dict[tuple[str, int | None], list[Record]] = defaultdict(list)
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(**self._config)
                await producer.start()
                self._producer = producer

    async def stop(self) -> None:
        async with self._lock:
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None

    def add(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None,
            partition: int | None = None) -> None:
        """Queue one record for the next :meth:`flush` (records keep their order per partition)."""
        self._records[(topic, partition)].append((key, value, headers))

    def __len__(self) -> int:
        return sum(len(r) for r in self._records.values())

    async def flush(self) -> int:
        """Send every queued record and wait until all are acknowledged; return how many."""
        if not self._records:
            return 0
        if self._producer is None:
            await self.start()
        records, self._records = self._records, defaultdict(list)
        by_partition: dict[tuple[str, int], list[Record]] = defaultdict(list)
        for (topic, partition), recs in records.items():
            if partition is not None:
                by_partition[(topic, partition)] += recs
                continue
            partitions = await self._partitions_of(topic)
            for rec in recs:
                by_partition[(topic, self._partitioner(rec[0], partitions, partitions))].append(rec)
        futures, sent = [], 0
        for (topic, partition), recs in by_partition.items():
            batch = self._producer.create_batch()
            for key, value, headers in recs:
                if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                    futures.append(await self._producer.send_batch(batch, topic, partition=partition))
                    batch = self._producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                        raise DeliveryFailed(f"a record for {topic} is larger than a whole batch")
                sent += 1
            futures.append(await self._producer.send_batch(batch, topic, partition=partition))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise DeliveryFailed(f"{len(failed)} of {len(futures)} batches not acknowledged: {failed[0]!r}")
        return sent

    async def _partitions_of(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        return self._partitions[topic]
