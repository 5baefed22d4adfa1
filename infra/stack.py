"""``python -m infra.stack up|down|status|topics``: the local Kafka broker and Redis.

``up`` is idempotent (a running service is left alone) and creates the topics; ``down`` stops both and
waits until their processes are gone.
"""

from __future__ import annotations

import argparse
import sys

from infra.kafka_broker import KafkaBroker
from infra.redis_server import RedisServer
from infra.settings import get_settings
from infra.topics import ensure_topics, topic_counts


def up() -> None:
    s = get_settings()
    RedisServer(s).start()
    KafkaBroker(s).start()
    created = ensure_topics(s)
    print(f"topics: created {created}" if created else "topics: all present")


def down() -> None:
    s = get_settings()
    KafkaBroker(s).stop()
    RedisServer(s).stop()


def status() -> int:
    s = get_settings()
    kafka, redis_ = KafkaBroker(s), RedisServer(s)
    print(kafka.status())
    print(redis_.status())
    return 0 if kafka.pid() and redis_.pid() else 1


def topics() -> None:
    for name, count in topic_counts(get_settings()).items():
        print(f"{name:<20} {count:>10} messages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "topics"])
    cmd = parser.parse_args(argv).command
    if cmd == "status":
        return status()
    {"up": up, "down": down, "topics": topics}[cmd]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
