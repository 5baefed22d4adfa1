"""Dead letters: every input a worker cannot use goes to the dead-letter topic with its reason.

A dead letter names its input (``<stage>/<topic>/<partition>/<offset>``) and carries the input's Kafka
timestamp, never the wall clock, so a replay produces the same record and readers can drop repeats.

>>> dl = make_dead_letter("clicks", 0, 42, "validate", "not JSON: ...", b"{oops", arrival_ms=7)
>>> dl.dead_letter_id, dl.offset, dl.payload, dl.truncated
('validate/clicks/0/42', 42, '{oops', False)
>>> make_dead_letter("clicks", 0, 43, "validate", "too big", b"x" * 100_000, 7).truncated
True
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TypeVar

from infra.settings import Settings
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import DeadLetter, Event

E = TypeVar("E", bound=Event)
# A dead letter must fit the broker's message size however large the bad input was.
MAX_PAYLOAD_BYTES = 64 * 1024


def dead_letter_id(stage: str, topic: str, partition: int, offset: int, payload: bytes | None) -> str:
    """The input's coordinates, or a digest of the payload when it has none (offset -1)."""
    if offset >= 0:
        return f"{stage}/{topic}/{partition}/{offset}"
    return f"{stage}/{topic}/{partition}/sha1:{hashlib.sha1(payload or b'').hexdigest()}"


def make_dead_letter(topic: str, partition: int, offset: int, stage: str, reason: str,
                     payload: bytes | None, arrival_ms: int = -1, max_payload: int = MAX_PAYLOAD_BYTES) -> DeadLetter:
    raw = payload or b""
    return DeadLetter(dead_letter_id=dead_letter_id(stage, topic, partition, offset, raw), source_topic=topic,
                      partition=partition, offset=offset, stage=stage, reason=reason,
                      payload=raw[:max_payload].decode("utf-8", errors="backslashreplace"),
                      truncated=len(raw) > max_payload, arrival_ms=arrival_ms)


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
                                       record.value, record.timestamp))
            return None

    def flush(self) -> None:
        self.producer.flush()
