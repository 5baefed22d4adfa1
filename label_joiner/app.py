"""The always-on label joiner: ``faust -A label_joiner.app worker -l info``.

Key: impression id (impressions, clicks and conversions are co-partitioned by it). Windows: from
settings (click 30 s, conversion 7 days by default). State: one dict per open impression in a faust
table backed by a changelog topic, so a restarted or rebalanced worker recovers it. Output: training
examples and matured labels to Kafka; undecodable, late, orphan and out-of-window events to the
dead-letter topic with their reason. Scheme: ``ADS_LABEL_SCHEME`` = naive | fnw | delay_curve.
"""

from __future__ import annotations

import asyncio
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
from schemas.events import Click, Conversion, DeadLetter, Impression
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

# Keys and values of the table are JSON (the app's default serializers above).
table = app.Table("label-joiner-state", default=None, partitions=settings.kafka.default_partitions)
state = FaustState(table)
joiner = LabelJoiner(settings.windows, make_scheme(SCHEME, DelayCurve.load_latest(settings)), state)
# The agent and the timer both change state; each runs process -> flush outputs -> write changelog alone.
step = asyncio.Lock()
HANDLERS = {Impression: joiner.on_impression, Click: joiner.on_click, Conversion: joiner.on_conversion}


def _headers(message) -> list[tuple[str, bytes]]:
    h = message.headers or []
    return list(h.items()) if isinstance(h, Mapping) else list(h)


async def _send(topic, event) -> None:
    """Straight to the Kafka client (faust's send buffer is not covered by a reliable flush)."""
    key, value, headers = encode(event)
    await topic.send(key=key, value=value, headers=headers)


def _dead_letters(out: Outputs, partition: int):
    for rej in out.rejected:
        yield make_dead_letter(TOPIC_OF_CLASS[type(rej.event)], partition, -1, "label_joiner", rej.reason,
                               encode(rej.event)[1])


async def _emit(outputs: list[tuple[Outputs, int]]) -> None:
    """Send the outputs, then the state changes that account for them, each flushed (at least once)."""
    for out, partition in outputs:
        for ex in out.examples:
            await _send(out_examples, ex)
        for label in out.matured:
            await _send(out_matured, label)
        for dead in _dead_letters(out, partition):
            await _send(out_dead, dead)
    await app.producer.flush()
    joiner.save_progress()
    if await state.write_changelog():
        await app.producer.flush()


def _process(msg, undecodable: list[DeadLetter]) -> Outputs:
    """Decode one message and join it; an undecodable one becomes a dead letter with its offset."""
    cls = CLASS_OF_TOPIC[msg.topic]
    try:
        record = decode(cls, msg.value, _headers(msg))
    except InvalidEvent as exc:
        joiner.counts[str(exc).split(":", 1)[0]] += 1
        undecodable.append(make_dead_letter(msg.topic, msg.partition, msg.offset, "label_joiner", str(exc),
                                            msg.value))
        return Outputs()
    try:
        out = HANDLERS[cls](record, msg.partition)
        out.extend(joiner.advance(msg.partition))
    except Exception as exc:  # a bug must not stop the worker: the event goes to the dead letters
        log.exception("label_joiner: failed on %s[%d]@%d", msg.topic, msg.partition, msg.offset)
        joiner.counts["internal error"] += 1
        undecodable.append(make_dead_letter(msg.topic, msg.partition, msg.offset, "label_joiner",
                                            f"internal error: {exc!r}", msg.value))
        return Outputs()
    return out


@app.agent(raw_events)
async def join(stream):
    """Key: impression id. Per batch of events: decode, join, advance watermarks, emit, write state.
    faust acks the batch's events when this body returns, and commits their offsets later."""
    async for events in stream.take_events(2000, within=0.1):
        async with step:
            undecodable: list[DeadLetter] = []
            outputs = [(_process(e.message, undecodable), e.message.partition) for e in events]
            for letter in undecodable:
                await _send(out_dead, letter)
            await _emit(outputs)


@app.timer(interval=1.0)
async def tick() -> None:
    """Advance every partition's watermark even when no event arrives (idle inputs, end of a burst)."""
    live = not (app.rebalancing or app.in_recovery) and app.tables.recovery.completed.is_set()
    joiner.running(live)
    if not live:
        return
    async with step:
        await _emit([(joiner.advance(p), p) for p in joiner.partitions()])


@app.timer(interval=10.0)
async def report() -> None:
    """Periodic progress: state size, watermarks and counters."""
    if app.rebalancing or app.in_recovery:
        log.info("label_joiner: recovering or rebalancing; %d entries in state so far", len(state))
        return
    log.info("label_joiner: %d entries in state, idle %s, watermarks %s, %s", len(state), joiner.idle(),
             joiner.watermarks(), dict(joiner.counts))
