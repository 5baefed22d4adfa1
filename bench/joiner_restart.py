"""State size and restart-to-caught-up time of the label joiner with many open impressions in its state.

``python -m bench.joiner_restart --open 5000000`` (``make bench-restart``):

1. seeds the state of a joiner group with ``--open`` clicked impressions (each stays open for its
   conversion window), by running the join's own code over synthetic impressions and clicks into the
   task stores (RocksDB) and writing the same changes to the group's changelog topic, as a worker would;
2. reports bytes per open impression: the stored record (MessagePack), RocksDB's files, the changelog's log;
3. restarts: 1,000 new impressions arrive, a worker process starts, and the time until the group has
   committed them is measured, (a) with the local state present (only the changelog's tail is read)
   and (b) with the local state deleted (the whole changelog is read back).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
import uuid
from pathlib import Path

import orjson

from infra.settings import Settings, get_settings
from infra.topics import ensure_changelog, group_lag, with_topic_prefix
from label_joiner.join import Emitted, PartitionJoin
from label_joiner.rules import Rules
from label_joiner.schemes import NaiveScheme
from label_joiner.worker import start_worker, stop_worker
from schemas.codec import schema_headers
from schemas.events import Impression
from streams.simulator.config import recent_start
from streams.state import RocksStore


def impression(i: int, t: int) -> dict:
    return {"impression_id": f"open-i{i}", "request_id": f"r{i}", "user_id": i % 100_000, "ad_id": i % 20_000,
            "advertiser_id": i % 500, "campaign_id": i % 5_000, "placement": "feed", "position": i % 5,
            "device": "mobile", "bid": 1.0, "event_time_ms": t, "model_version": "sim-serving-v1",
            "served_pctr": 0.03, "served_pcvr": 0.02, "feature_ref": f"open-i{i}"}


def partition_of(key: bytes, n: int) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


async def write_changelog(settings: Settings, topic: str, p: int, changes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.kafka.aiokafka_config(), acks="all", max_batch_size=1024 * 1024,
                                max_request_size=4 * 1024 * 1024, linger_ms=5)
    await producer.start()
    try:
        futures, batch = [], producer.create_batch()
        for key, value in changes:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=p))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        futures.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def seed(settings: Settings, group: str, n_open: int, partitions: int) -> dict[str, float]:
    """Open impressions in the task stores and the changelog, through the join's own code."""
    rules = Rules.from_settings(settings.windows)
    t0_ms = int(recent_start(2).timestamp() * 1000)
    stores = [RocksStore(settings.var_dir / "state" / group / str(p)) for p in range(partitions)]
    joins = [PartitionJoin(rules, NaiveScheme(), s) for s in stores]
    changelog = f"{group}-changelog"
    ensure_changelog(settings, changelog, [settings.topics.impressions])
    record_bytes = 0
    started, last = time.monotonic(), time.monotonic()
    chunk = 200_000
    for lo in range(0, n_open, chunk):
        out = Emitted()
        for i in range(lo, min(lo + chunk, n_open)):
            t = t0_ms + i  # one per millisecond of event time
            imp = impression(i, t)
            p = partition_of(imp["impression_id"].encode(), partitions)
            joins[p].on_event("impression", imp, t + 500, i, out)
            joins[p].on_event("click", {"click_id": f"open-c{i}", "impression_id": imp["impression_id"],
                                        "user_id": imp["user_id"], "ad_id": imp["ad_id"], "event_time_ms": t + 2000},
                              t + 2500, i, out)
        for p, store in enumerate(stores):
            changes = store.changes()
            record_bytes += sum(len(v) for _, v in changes if v is not None)
            asyncio.run(write_changelog(settings, changelog, p, changes))
            store.commit(None)
        if time.monotonic() - last > 5:
            last = time.monotonic()
            print(f"seed: {min(lo + chunk, n_open):,} of {n_open:,} open impressions "
                  f"({min(lo + chunk, n_open) / (last - started):,.0f}/s)", flush=True)
    ends = asyncio.run(changelog_ends(settings, changelog, partitions))
    for p, store in enumerate(stores):
        store.commit(ends[p])
        store.db.compact_range(None, None)
        store.close()
    rocks = sum(f.stat().st_size for f in (settings.var_dir / "state" / group).rglob("*") if f.is_file())
    return {"record": record_bytes / n_open, "rocksdb": rocks / n_open}


async def changelog_ends(settings: Settings, topic: str, partitions: int) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**settings.kafka.aiokafka_config())
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def changelog_bytes(settings: Settings, topic: str) -> int:
    """Bytes of the changelog's log segments on the local broker."""
    return sum(f.stat().st_size for d in (settings.var_dir / "kafka" / "data").glob(f"{topic}-*")
               for f in d.glob("*.log"))


def restart(settings: Settings, group: str, log: Path, n_new: int = 1000) -> float:
    """Seconds from starting a worker process until it has committed ``n_new`` new impressions."""
    from kafka import KafkaProducer

    t = settings.topics
    now = int(time.time() * 1000)
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for i in range(n_new):
        imp = impression(10**9 + i, now - 60_000)
        producer.send(t.impressions, key=imp["impression_id"].encode(), value=orjson.dumps(imp),
                      headers=schema_headers(Impression), timestamp_ms=now - 59_000)
    producer.flush()
    producer.close()
    t0 = time.monotonic()
    proc = start_worker(settings, group, log)
    try:
        while True:
            done, total = group_lag(settings, group, [t.impressions, t.clicks, t.conversions])
            if total and done >= total:
                return time.monotonic() - t0
            assert proc.poll() is None, f"worker exited, see {log}"
            time.sleep(0.2)
    finally:
        stop_worker(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--open", type=int, default=5_000_000, help="open impressions in the state")
    a = p.parse_args()
    base = get_settings()
    settings = with_topic_prefix(base, f"restart-{uuid.uuid4().hex[:6]}")
    group = f"restart-{uuid.uuid4().hex[:6]}"
    partitions = settings.kafka.default_partitions
    t0 = time.monotonic()
    size = seed(settings, group, a.open, partitions)
    print(f"seeded {a.open:,} open impressions in {time.monotonic() - t0:.0f} s", flush=True)
    log = base.var_dir / "bench" / f"{group}.log"
    warm = restart(settings, group, log)
    shutil.rmtree(settings.var_dir / "state" / group)
    cold = restart(settings, group, log)
    changelog = changelog_bytes(base, f"{group}-changelog") / a.open
    print(f"\n{'open impressions':<44} {a.open:>12,}")
    print(f"{'bytes per open impression: record (MessagePack)':<44} {size['record']:>12,.0f}")
    print(f"{'bytes per open impression: RocksDB files':<44} {size['rocksdb']:>12,.0f}")
    print(f"{'bytes per open impression: changelog log':<44} {changelog:>12,.0f}")
    print(f"{'restart to caught up, local state (s)':<44} {warm:>12.1f}")
    print(f"{'restart to caught up, state from changelog (s)':<44} {cold:>12.1f}")


if __name__ == "__main__":
    main()
