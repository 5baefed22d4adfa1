"""Simulator throughput into Kafka versus a bare kafka-python producer sending the same payloads.

``python -m bench.produce --hours 4`` prints a table. The bare producer is the ceiling of kafka-python's
``send()`` on this machine: it sends pre-built (topic, key, value, headers) tuples in a tight loop. The
simulator rows include everything a run does after generating the traffic: the schedule's messages,
pacing checks and sending. The plain row uses ``send()`` per record (kafka-python); the batched row
(``--batched``, for load tests) appends records to aiokafka record batches and sends a batch per request. All
rows are idempotent with acks=all, send the same records, and use fresh topics; the traffic is generated
once and timed outside.
"""

from __future__ import annotations

import argparse
import time
import uuid

from infra.settings import Settings, get_settings
from infra.topics import with_topic_prefix
from streams.simulator.batched import send_batched
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate, make_producer, send


def fresh_settings(tag: str) -> Settings:
    """Settings whose topics are new, so the two runs do not share partitions or batches."""
    return with_topic_prefix(get_settings(), f"bench-{tag}")


def bare_producer(cfg: SimulatorConfig) -> tuple[int, float]:
    settings = fresh_settings(f"bare-{uuid.uuid4().hex[:6]}")
    messages = [m[:4] for m in iter_messages(generate(cfg, settings).schedule)]
    producer = make_producer(settings)
    t0 = time.perf_counter()
    for topic, key, value, headers in messages:
        producer.send(topic, value=value, key=key, headers=headers)
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return len(messages), elapsed


def simulator(cfg: SimulatorConfig, sender=send, tag: str = "sim") -> tuple[int, float]:
    """The simulator's own send path (``send`` or ``send_batched``) for a run generated beforehand."""
    settings = fresh_settings(f"{tag}-{uuid.uuid4().hex[:6]}")
    gen = generate(cfg, settings)
    t0 = time.perf_counter()
    counts = sender(gen.schedule, settings, speed=0, start_ms=cfg.start_ms, log_every_s=1e9)
    return sum(counts.values()), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hours", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    cfg = SimulatorConfig(hours=a.hours, speed=0, users=100_000, ads=20_000)
    rows = []
    for i in range(a.repeat):
        for name, fn in (("bare kafka-python producer", bare_producer), ("simulator, send()", simulator),
                         ("simulator, batched", lambda c: simulator(c, send_batched, "simb"))):
            n, s = fn(cfg)
            rows.append((i, name, n, s, n / s))
            print(f"run {i}: {name}: {n:,} events in {s:.2f}s", flush=True)
    best = {name: max(r[4] for r in rows if r[1] == name) for _, name, *_ in rows}
    ceiling = best["bare kafka-python producer"]
    print(f"\n{'path':<30} {'events':>10} {'best events/s':>14} {'x kafka-python ceiling':>23}")
    for name, rate in best.items():
        n = next(r[2] for r in rows if r[1] == name)
        print(f"{name:<30} {n:>10,} {rate:>14,.0f} {rate / ceiling:>22.2f}x")


if __name__ == "__main__":
    main()
