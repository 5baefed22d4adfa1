"""The label joiner as a stream-engine processor: decode a batch, join it, encode what it emitted.

One :class:`JoinProcessor` per task (input partition p of impressions, clicks, conversions and feedback).
"""

from __future__ import annotations

import time
from collections import Counter

import orjson
from aiokafka.structs import ConsumerRecord

from infra.settings import Settings
from label_joiner.join import Emitted, PartitionJoin
from label_joiner.rules import Rules
from label_joiner.schemes import LabelScheme
from schemas.codec import InvalidEvent, encode, schema_headers
from schemas.events import Click, Conversion, Impression, MaturedLabel, NegativeFeedback, TrainingExample
from schemas.fast import FastDecoder
from streams.dead_letter import make_dead_letter
from streams.engine import Outbox
from streams.state import Store

STAGE = "label_joiner"
# An input this large is not joined (its fields would travel into every output and the state).
MAX_EVENT_BYTES = 64 * 1024
SOURCE_OF_CLASS = {Impression: "impression", Click: "click", Conversion: "conversion", NegativeFeedback: "feedback"}


class JoinProcessor:
    def __init__(self, settings: Settings, scheme: LabelScheme, partition: int, store: Store):
        t = settings.topics
        self.partition = partition
        w = settings.windows
        self.join = PartitionJoin(Rules.from_settings(w), scheme, store,
                                  out_of_orderness_ms=int(w.max_out_of_orderness_s * 1000),
                                  idle_advance_rate=w.idle_advance_rate)
        self.max_future_skew_ms = int(w.max_future_skew_s * 1000)
        self.counts: Counter[str] = self.join.counts
        self.inputs = {t.impressions: Impression, t.clicks: Click, t.conversions: Conversion,
                       t.negative_feedback: NegativeFeedback}
        self.decoders = {topic: FastDecoder(cls) for topic, cls in self.inputs.items()}
        self.topic_of_source = {SOURCE_OF_CLASS[cls]: topic for topic, cls in self.inputs.items()}
        self.examples_topic, self.matured_topic = t.training_examples, t.matured_labels
        self.dead_letter_topic = t.dead_letters
        self._example_headers = schema_headers(TrainingExample)
        self._matured_headers = schema_headers(MaturedLabel)

    def process(self, records: list[ConsumerRecord], out: Outbox) -> None:
        emitted = Emitted()
        on_event = self.join.on_event
        # The wall clock is only an upper bound here (a producer whose clock runs fast would move every input's
        # clock ahead); it never moves the event-time clock.
        latest_plausible = int(time.time() * 1000) + self.max_future_skew_ms
        for r in records:
            value = r.value
            if value is not None and len(value) > MAX_EVENT_BYTES:
                self._dead(out, r.topic, r.offset, f"event too large: {len(value):,} bytes", value, r.timestamp)
                continue
            if r.timestamp > latest_plausible:
                self._dead(out, r.topic, r.offset, f"record time ahead of the wall clock: {r.timestamp} > "
                           f"{latest_plausible} (the wall clock + {self.max_future_skew_ms} ms)", value, r.timestamp)
                continue
            try:
                event = self.decoders[r.topic].decode_dict(value, r.headers)
            except InvalidEvent as exc:
                self._dead(out, r.topic, r.offset, str(exc), value, r.timestamp)
                continue
            except Exception as exc:  # one record's failure is its dead letter, never a crash loop
                self._dead(out, r.topic, r.offset, f"undecodable: {type(exc).__name__}: {exc}"[:500], value,
                           r.timestamp)
                continue
            try:
                on_event(SOURCE_OF_CLASS[self.inputs[r.topic]], event, r.timestamp, r.offset, emitted)
            except Exception as exc:  # a bug shown by one record: its dead letter too
                self._dead(out, r.topic, r.offset, f"could not join: {type(exc).__name__}: {exc}"[:500], value,
                           r.timestamp)
        self._write(emitted, out)

    def advance(self, idle_topics: set[str], wall_ms: int, out: Outbox) -> None:
        emitted = Emitted()
        idle = {SOURCE_OF_CLASS[self.inputs[t]] for t in idle_topics if t in self.inputs}
        self.join.advance(idle, wall_ms, emitted)
        self._write(emitted, out)

    def _write(self, emitted: Emitted, out: Outbox) -> None:
        dumps, topic, headers = orjson.dumps, self.examples_topic, self._example_headers
        out.records += [(topic, ex["impression_id"].encode(), dumps(ex), headers, None) for ex in emitted.examples]
        topic, headers = self.matured_topic, self._matured_headers
        out.records += [(topic, m["impression_id"].encode(), dumps(m), headers, None) for m in emitted.matured]
        for rej in emitted.rejected:
            self._dead(out, self.topic_of_source[rej.source], rej.offset, rej.reason, dumps(rej.event), rej.arrival,
                       counted=True)

    def _dead(self, out: Outbox, topic: str, offset: int, reason: str, payload: bytes | None, arrival: int,
              counted: bool = False) -> None:
        if not counted:
            self.counts[reason.split(":", 1)[0]] += 1
        key, value, headers = encode(make_dead_letter(topic, self.partition, offset, STAGE, reason, payload, arrival))
        out.add(self.dead_letter_topic, key, value, headers)
