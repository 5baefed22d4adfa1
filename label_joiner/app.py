"""The always-on label joiner: ``faust -A label_joiner.app worker -l info``.

Key: impression id (impressions, clicks and conversions are co-partitioned by it). Windows: from
settings (click 30 s, conversion 7 days by default). State: one dict per open impression in a faust
table backed by a changelog topic, so a restarted or rebalanced worker recovers it. Output: training
examples and matured labels to Kafka; undecodable, late, orphan and out-of-window events to the
dead-letter topic with their reason. Scheme: ``ADS_LABEL_SCHEME`` = naive | fnw | delay_curve.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import faust

from infra.settings import get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.faust_state import FaustState
from label_joiner.join import LabelJoiner, Outputs
from label_joiner.schemes import make_scheme
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import Click, Conversion, Impression
from streams.dead_letter import make_dead_letter

log = logging.getLogger(__name__)
# faust logs every sent message at debug level; building those records costs more than the join itself.
logging.getLogger("faust.topics").setLevel(logging.INFO)
settings = get_settings()
T = settings.topics
SCHEME = os.environ.get("ADS_LABEL_SCHEME", "naive")
CLASS_OF_TOPIC = {T.impressions: Impression, T.clicks: Click, T.conversions: Conversion}
TOPIC_OF_CLASS = {cls: topic for topic, cls in CLASS_OF_TOPIC.items()}

app = faust.App(
    os.environ.get("ADS_LABEL_JOINER_ID", "label-joiner"),
    broker=[f"kafka://{b}" for b in settings.kafka.bootstrap_servers.split(",")],
    store="memory://",
    datadir=str(settings.var_dir / "faust"),
    topic_partitions=settings.kafka.default_partitions,
    topic_replication_factor=settings.kafka.replication_factor,
    web_enabled=False,
    producer_acks=-1,
    producer_linger=0.01,
    producer_max_batch_size=256 * 1024,
    broker_max_poll_records=2000,
    broker_commit_every=1000,
    broker_commit_interval=1.0,
    stream_wait_empty=False,
    # A crashed worker's partitions move to a live one after this long.
    broker_session_timeout=10.0,
    broker_heartbeat_interval=2.0,
    key_serializer="json",
    value_serializer="json",
)

raw_events = app.topic(T.impressions, T.clicks, T.conversions, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
out_examples = app.topic(T.training_examples, key_serializer="raw", value_serializer="raw")
out_matured = app.topic(T.matured_labels, key_serializer="raw", value_serializer="raw")
out_dead = app.topic(T.dead_letters, key_serializer="raw", value_serializer="raw")

# Keys and values of the tables are JSON (the app's default serializers above).
state = app.Table("label-joiner-state", default=None, partitions=settings.kafka.default_partitions)
progress = app.Table("label-joiner-progress", default=None, partitions=settings.kafka.default_partitions)
joiner = LabelJoiner(settings.windows, make_scheme(SCHEME, DelayCurve.load_latest(settings)), FaustState(state),
                     progress=FaustState(progress))


def _headers(message) -> list[tuple[str, bytes]]:
    h = message.headers or []
    return list(h.items()) if isinstance(h, Mapping) else list(h)


def _send(topic, event) -> None:
    """Buffered send; faust flushes the producer before it commits the input offsets (at least once)."""
    key, value, headers = encode(event)
    topic.send_soon(key=key, value=value, headers=headers)


def _emit(out: Outputs, partition: int) -> None:
    for ex in out.examples:
        _send(out_examples, ex)
    for label in out.matured:
        _send(out_matured, label)
    for rej in out.rejected:
        _send(out_dead, make_dead_letter(TOPIC_OF_CLASS[type(rej.event)], partition, -1, "label_joiner",
                                               rej.reason, encode(rej.event)[1]))


@app.agent(raw_events)
async def join(stream):
    """Decode, join, advance the watermark, emit; one event at a time per partition."""
    async for event in stream.events():
        msg = event.message
        cls = CLASS_OF_TOPIC[msg.topic]
        try:
            record = decode(cls, msg.value, _headers(msg))
        except InvalidEvent as exc:
            joiner.counts[str(exc).split(":", 1)[0]] += 1
            _send(out_dead, make_dead_letter(msg.topic, msg.partition, msg.offset, "label_joiner",
                                                   str(exc), msg.value))
            continue
        if cls is Impression:
            out = joiner.on_impression(record, msg.partition)
        elif cls is Click:
            out = joiner.on_click(record, msg.partition)
        else:
            out = joiner.on_conversion(record, msg.partition)
        out.extend(joiner.advance(msg.partition))
        _emit(out, msg.partition)


@app.timer(interval=1.0)
async def tick() -> None:
    """Advance every partition's watermark even when no event arrives (idle inputs, end of a burst)."""
    for partition in joiner.partitions():
        _emit(joiner.advance(partition), partition)
    joiner.checkpoint()


@app.timer(interval=10.0)
async def report() -> None:
    """Periodic progress: open state size, watermark and counters."""
    log.info("label_joiner: %d entries in state, watermarks %s, %s", len(state), joiner.watermarks(),
             dict(joiner.counts))
