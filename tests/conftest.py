"""Fixtures for tests against the real local stack (``make up`` starts it; ``make test`` does so).

A test that needs Kafka or Redis fails loudly when the service is down: it never skips.
"""

from __future__ import annotations

import uuid

import pytest

from infra.kafka_broker import KafkaBroker
from infra.redis_server import RedisServer
from infra.settings import Settings, get_settings
from infra.topics import with_topic_prefix


@pytest.fixture(autouse=True)
def torch_threads():
    """Restore torch's intra-op thread count after each test: the scorer sets it for its process, and training
    results (float reduction order) depend on it, so one test must not change another's numbers."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kafka_settings() -> Settings:
    """Settings whose topics are fresh for this test session, created on the running broker."""
    base = get_settings()
    if not KafkaBroker(base).ready():
        pytest.fail(f"Kafka is not reachable at {base.kafka.bootstrap_servers}: run `make up`")
    return with_topic_prefix(base, f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def fresh_topics(kafka_settings) -> Settings:
    """Topics of this test alone."""
    return with_topic_prefix(kafka_settings, f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def redis_settings() -> Settings:
    base = get_settings()
    if not RedisServer(base).ready():
        pytest.fail(f"Redis is not reachable at {base.redis.host}:{base.redis.port}: run `make up`")
    return base


def consume_all(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Read ``topic`` from the beginning until ``expected`` records arrived (or fail on timeout)."""
    import time

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, **settings.kafka.client_config(), auto_offset_reset="earliest",
                             isolation_level="read_committed",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    assert len(records) >= expected, f"{topic}: got {len(records)} records, expected {expected}"
    return records


# A finished test run has no later traffic to move the joiner's clock past its last windows: once every input is
# idle, the clock advances from the last data at this many event-time seconds per second (25 h in a second).
CLOSE_WHEN_IDLE = 100_000.0


def simulated_run(topics: Settings, var_dir, cfg, conversion_window_s: float = 3600.0, send_it: bool = True):
    """Send a drained simulator run to ``topics`` (unless not ``send_it``) with a short conversion window (every
    window closes within the run); return the settings a worker must use and the generated run."""
    from streams.simulator.run import generate, send

    settings = topics.model_copy(update={
        "var_dir": var_dir,
        "windows": topics.windows.model_copy(update={"conversion_window_s": conversion_window_s,
                                                     "idle_advance_rate": CLOSE_WHEN_IDLE}),
    })
    gen = generate(cfg, settings, drain=True)
    if send_it:
        send(gen.schedule, settings, speed=0, start_ms=cfg.start_ms)
    return settings, gen
