"""The simulator's batched producer path, for load tests that must outrun the joiner.

kafka-python's ``send()`` costs tens of microseconds per record in Python (about 14k events/s on this
machine, ``make bench-produce``). This path uses aiokafka's public batch API instead (``create_batch`` /
``send_batch``): records are appended to one record batch per partition (built by aiokafka's C extension)
and each full batch is sent as one request. The guarantees are the ordinary producer's: idempotent, acks from
every in-sync replica, records of a partition in delivery order, and a record's key picks its partition with
Kafka's default partitioner (murmur2), so a consumer sees the same partitions either way.

aiokafka ships with faust-streaming (a chosen dependency), so this adds no package.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from infra.settings import Settings
from streams.simulator.delivery import Schedule, iter_messages
from streams.simulator.run import FUTURE_SLACK_MS

BATCH_BYTES = 1 << 20
PACE_EVERY = 4096  # records between two pacing checks


def send_batched(schedule: Schedule, settings: Settings, speed: float, start_ms: int, log_every_s: float = 5.0,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Send every delivery in batches; with ``speed`` > 0, simulated time advances ``speed`` times wall-clock;
    ``progress(sent, delivery_ms)`` is called every few thousand records. Returns the records acknowledged per
    topic (the same contract as :func:`streams.simulator.run.send`)."""
    return asyncio.run(_send(schedule, settings, speed, start_ms, log_every_s, progress))


async def _send(schedule: Schedule, settings: Settings, speed: float, start_ms: int, log_every_s: float,
                progress: Callable[[int, int], None] | None) -> dict[str, int]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(**settings.kafka.aiokafka_config(), acks="all", enable_idempotence=True,
                                max_batch_size=BATCH_BYTES, max_request_size=4 * BATCH_BYTES,
                                request_timeout_ms=60_000)
    await producer.start()
    partitioner = DefaultPartitioner()
    partitions: dict[str, list[int]] = {}
    batches: dict[tuple[str, int], object] = {}
    batch_counts: dict[tuple[str, int], int] = {}
    pending: list[tuple[asyncio.Future, str, int]] = []
    counts: dict[str, int] = {}
    sent = future = 0
    wall0 = last_log = time.monotonic()
    now_ms = int(time.time() * 1000)

    async def flush(key: tuple[str, int]) -> None:
        batch = batches.pop(key)
        pending.append((await producer.send_batch(batch, key[0], partition=key[1]), key[0], batch_counts.pop(key)))

    async def settle(done: Callable[[asyncio.Future], bool]) -> None:
        """Collect acknowledged batches (all of them with ``done`` always true); a failed batch raises."""
        keep = []
        for fut, topic, n in pending:
            if done(fut):
                await fut
                counts[topic] = counts.get(topic, 0) + n
            else:
                keep.append((fut, topic, n))
        pending[:] = keep

    try:
        for topic, key, value, headers, when in iter_messages(schedule):
            if when > now_ms + FUTURE_SLACK_MS and when > (now_ms := int(time.time() * 1000)) + FUTURE_SLACK_MS:
                future += 1  # not delivered yet in the real world (and the broker refuses future timestamps)
                continue
            if sent % PACE_EVERY == 0:
                if speed > 0 and (ahead := (when - start_ms) / 1000.0 / speed - (time.monotonic() - wall0)) > 0:
                    for k in list(batches):  # what is due goes out before the pause
                        await flush(k)
                    await asyncio.sleep(ahead)
                await settle(lambda f: f.done())
                if progress is not None:
                    progress(sent, when)
                if time.monotonic() - last_log >= log_every_s:
                    last_log = time.monotonic()
                    print(f"simulator (batched): {sent:,}/{len(schedule):,} sent, simulated "
                          f"{(when - start_ms) / 3_600_000:.2f} h, {sent / (last_log - wall0):,.0f} events/s",
                          flush=True)
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            ids = partitions[topic]
            target = (topic, partitioner(key, ids, ids))
            batch = batches.get(target)
            if batch is None:
                batch = batches[target] = producer.create_batch()
                batch_counts[target] = 0
            if batch.append(key=key, value=value, timestamp=when, headers=headers) is None:  # full
                await flush(target)
                batch = batches[target] = producer.create_batch()
                batch_counts[target] = 0
                if batch.append(key=key, value=value, timestamp=when, headers=headers) is None:
                    raise ValueError(f"a record of {len(value):,} bytes does not fit in a {BATCH_BYTES:,}-byte batch")
            batch_counts[target] += 1
            sent += 1
        for k in list(batches):
            await flush(k)
        await settle(lambda f: True)
        if future:
            print(f"simulator (batched): {future:,} deliveries lie after the present: not sent", flush=True)
    finally:
        await producer.stop()
    return counts
