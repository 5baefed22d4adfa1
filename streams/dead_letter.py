"""Dead letters: every input a worker cannot use goes to the dead-letter topic with its reason.

>>> dl = make_dead_letter("clicks", 0, 42, "validate", "not JSON: ...", b"{oops")
>>> dl.source_topic, dl.offset, dl.payload
('clicks', 42, '{oops')
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TypeVar

from infra.settings import Settings
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import DeadLetter, Event

E = TypeVar("E", bound=Event)


def make_dead_letter(topic: str, partition: int, offset: int, stage: str, reason: str,
                     payload: bytes | None) -> DeadLetter:
    return DeadLetter(source_topic=topic, partition=partition, offset=offset, stage=stage, reason=reason,
                      payload=(payload or b"").decode("utf-8", errors="backslashreplace"),
                      failed_at_ms=int(time.time() * 1000))


def reason_kind(reason: str) -> str:
    """The part of a reason before the first colon: the counter a dead letter is counted under."""
    return reason.split(":", 1)[0]


class DeadLetterSink:
    """Sends dead letters with kafka-python and counts them by reason kind."""

    def __init__(self, settings: Settings, stage: str, producer=None):
        from kafka import KafkaProducer

        self.topic = settings.topics.dead_letters
        self.stage = stage
        self.producer = producer or KafkaProducer(**settings.kafka.client_config(), acks="all", retries=10)
        self.counts: Counter[str] = Counter()

    def send(self, dead: DeadLetter) -> None:
        key, value, headers = encode(dead)
        self.producer.send(self.topic, key=key, value=value, headers=headers)
        self.counts[reason_kind(dead.reason)] += 1

    def decode(self, cls: type[E], record) -> E | None:
        """Decode a kafka-python ConsumerRecord as ``cls``, or dead-letter it and return None."""
        try:
            return decode(cls, record.value, record.headers)
        except InvalidEvent as exc:
            self.send(make_dead_letter(record.topic, record.partition, record.offset, self.stage, str(exc),
                                       record.value))
            return None

    def flush(self) -> None:
        self.producer.flush()
