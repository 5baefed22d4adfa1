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
import time
from collections import Counter
from collections.abc import Mapping

from infra.settings import get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.faust_state import FaustState
from label_joiner.input_reader import InputReader
from label_joiner.join import LabelJoiner, Outputs
from label_joiner.schemes import make_scheme
from label_joiner.sink import KafkaSink
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import Click, Conversion, DeadLetter, Impression
from streams.dead_letter import make_dead_letter
from streams.faust_app import faust_app

log = logging.getLogger(__name__)
settings = get_settings()
T = settings.topics
SCHEME = os.environ.get("ADS_LABEL_SCHEME", "naive")
CLASS_OF_TOPIC = {T.impressions: Impression, T.clicks: Click, T.conversions: Conversion}
TOPIC_OF_CLASS = {cls: topic for topic, cls in CLASS_OF_TOPIC.items()}
SOURCE_OF_TOPIC = {topic: cls.NAME for topic, cls in CLASS_OF_TOPIC.items()}

app = faust_app(os.environ.get("ADS_LABEL_JOINER_ID", "label-joiner"), settings)

raw_events = app.topic(T.impressions, T.clicks, T.conversions, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
# Outputs and changelog records bypass faust's per-message send path (see label_joiner/sink.py).
sink = KafkaSink(settings, client_id=f"{app.conf.id}-sink")
# Input messages faust fetched but never delivered are read again from here (see input_reader.py).
input_reader = InputReader(settings, app.conf.id)

# Keys and values of the table are JSON (the app's default serializers above).
table = app.Table("label-joiner-state", default=None, partitions=settings.kafka.default_partitions)
state = FaustState(table)
joiner = LabelJoiner(settings.windows, make_scheme(SCHEME, DelayCurve.load_latest(settings)), state)
joiner.caught_up(False)  # until the tick has checked the inputs' end offsets
# The agent and the timer both change state; each runs process -> flush outputs -> write changelog alone.
step = asyncio.Lock()
stats: Counter[str] = Counter()  # batches, events, join_s, write_s since the last report
# Per input partition: the offset after the last one faust delivered since the partition was assigned.
next_delivered: dict = {}
HANDLERS = {Impression: joiner.on_impression, Click: joiner.on_click, Conversion: joiner.on_conversion}


def _headers(message) -> list[tuple[str, bytes]]:
    h = message.headers or []
    return list(h.items()) if isinstance(h, Mapping) else list(h)


def _send(topic: str, event) -> None:
    key, value, headers = encode(event)
    sink.add(topic, key, value, headers)


def _dead_letters(out: Outputs, partition: int):
    for rej in out.rejected:
        yield make_dead_letter(TOPIC_OF_CLASS[type(rej.event)], partition, -1, "label_joiner", rej.reason,
                               encode(rej.event)[1])


async def _emit(outputs: list[tuple[Outputs, int]]) -> None:
    """Send the outputs, then the state changes that account for them, each flushed (at least once)."""
    for out, partition in outputs:
        for ex in out.examples:
            _send(T.training_examples, ex)
        for label in out.matured:
            _send(T.matured_labels, label)
        for dead in _dead_letters(out, partition):
            _send(T.dead_letters, dead)
    await sink.flush()
    joiner.save_progress()
    state.write_changelog(sink)
    await sink.flush()


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


def _die(reason: str) -> None:
    """End the process at once: nothing is acknowledged or committed, so a restart replays the batch."""
    log.critical("label_joiner: %s; exiting without acknowledging the batch (a restart replays it)", reason,
                 exc_info=True)
    logging.shutdown()
    os._exit(70)


async def _whole(step_coro) -> None:
    """Run one join -> flush outputs -> write state step to its end.

    faust acknowledges a batch as soon as the agent body leaves it, even by an exception or a
    cancellation (a worker being stopped), and later commits it. So a stop waits here until the step's
    writes are flushed, and a failed write (the broker unreachable past the producer's retries) ends the
    process instead of letting the batch be acknowledged."""
    work = asyncio.ensure_future(step_coro)
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if work.cancelled() or work.exception() is not None:
            _die("interrupted while writing a batch")
        raise
    except Exception:
        _die("could not write a batch")


async def _in_order(msg, gaps: list) -> list:
    """``msg`` preceded by the input messages of its partition that faust skipped, or nothing when the
    state already accounts for it (a replay after a restart).

    faust drops some fetched messages around start-up and rebalances without acknowledging them, and
    its commits stop in front of any offset never acknowledged. So every offset it skipped since the
    assignment began (where it seeks: the committed offset) is registered as a commit "gap" once the
    batch is flushed: those below the state's position are in the recovered state already, the others
    are read here straight from Kafka and joined first."""
    source = SOURCE_OF_TOPIC[msg.topic]
    delivered = next_delivered.get(msg.tp)
    if delivered is None:
        delivered = await input_reader.start_offset(msg.topic, msg.partition)
    next_delivered[msg.tp] = max(delivered, msg.offset + 1)
    expected = joiner.position(msg.partition, source)
    if expected is None:
        expected = delivered
    if msg.offset > min(delivered, expected):
        # faust's commit bookkeeping for offsets handled outside the stream (compacted or control
        # records) is this gap list: its commits pass the range once it is registered.
        gaps.append((msg.tp, min(delivered, expected), msg.offset - 1))
    if msg.offset < expected:
        joiner.counts["replayed message skipped"] += 1
        return []
    if msg.offset == expected:
        return [msg]
    missed = await input_reader.read(msg.topic, msg.partition, expected, msg.offset)
    log.warning("label_joiner: %s[%d] offsets %d..%d were not delivered by the stream; read %d of them "
                "directly", msg.topic, msg.partition, expected, msg.offset - 1, len(missed))
    joiner.counts["undelivered message read"] += len(missed)
    return [*missed, msg]


async def _skip_in_commits(tp, first: int, last: int) -> None:
    """Let faust's commits pass offsets ``first``..``last``, which its stream skipped.

    faust merges such a gap into its list of acknowledged offsets when it commits. It may also deliver
    some of those offsets again later (after a seek); acknowledging one a second time would put it in
    that list twice, and faust's commits would then crawl forward an offset per commit. So the range is
    also marked as acknowledged in faust's index, which its ``ack`` checks first."""
    consumer = app.consumer
    committed = consumer._committed_offset[tp]
    first = first if committed is None else max(first, committed + 1)
    if first > last:
        return
    await consumer._add_gap(tp, first, last)
    consumer._acked_index[tp].update(range(first, last + 1))


async def _join_batch(events) -> None:
    async with step:
        started = time.perf_counter()
        undecodable: list[DeadLetter] = []
        outputs, gaps = [], []
        for event in events:
            for msg in await _in_order(event.message, gaps):
                outputs.append((_process(msg, undecodable), msg.partition))
                joiner.processed(msg.partition, SOURCE_OF_TOPIC[msg.topic], msg.offset)
        for letter in undecodable:
            _send(T.dead_letters, letter)
        joined = time.perf_counter()
        await _emit(outputs)
        for tp, first, last in gaps:
            await _skip_in_commits(tp, first, last)
        stats.update(events=len(events), batches=1, join_s=joined - started, write_s=time.perf_counter() - joined)


async def _advance_all() -> None:
    async with step:
        await _emit([(joiner.advance(p), p) for p in joiner.partitions()])


@app.agent(raw_events)
async def join(stream):
    """Key: impression id. Per batch of events: decode, join, advance watermarks, emit, write state.
    faust acks the batch's events when this body returns, and commits their offsets later."""
    async for events in stream.take_events(2000, within=0.03):
        await _whole(_join_batch(events))


@app.timer(interval=1.0)
async def tick() -> None:
    """Advance every partition's watermark even when no event arrives (idle inputs, end of a burst)."""
    live = not (app.rebalancing or app.in_recovery) and app.tables.recovery.completed.is_set()
    async with step:
        joiner.running(live)
    if live:
        joiner.caught_up(joiner.quiet() and await _inputs_read_to_end())
        await _whole(_advance_all())


async def _inputs_read_to_end() -> bool:
    """True when every assigned input partition has been joined up to its log end."""
    assigned = sorted({tp.partition for tp in app.consumer.assignment() if tp.topic in SOURCE_OF_TOPIC})
    try:
        ends = await asyncio.wait_for(input_reader.end_offsets(list(SOURCE_OF_TOPIC), assigned), timeout=5)
    except Exception as exc:  # the broker unreachable: not idle, whatever the silence
        log.warning("label_joiner: cannot read the inputs' end offsets (%r); not treating the stream as idle", exc)
        return False
    for (topic, partition), end in ends.items():
        position = joiner.position(partition, SOURCE_OF_TOPIC[topic])
        if position is None:
            position = await input_reader.start_offset(topic, partition)
        if position < end:
            return False
    return True


@app.on_rebalance_complete.connect
async def keep_owned_partitions(app, **kwargs) -> None:
    """After a rebalance (state recovered, streams not resumed yet): drop what now belongs to another
    worker and rebuild the join's index, watermarks and input positions from the state."""
    owned = {tp.partition for tp in app.consumer.assignment() if tp.topic in SOURCE_OF_TOPIC}
    async with step:
        dropped = state.retain(owned)
        joiner.running(False)
        next_delivered.clear()  # faust seeks every assigned partition to its committed offset
    log.info("label_joiner: rebalanced; owns input partitions %s (%d entries of other partitions dropped)",
             sorted(owned), dropped)


@app.on_before_shutdown.connect
async def close_clients(app, **kwargs) -> None:
    await sink.stop()
    await input_reader.stop()


@app.timer(interval=10.0)
async def report() -> None:
    """Periodic progress: state size, watermarks and counters."""
    if app.rebalancing or app.in_recovery:
        log.info("label_joiner: recovering or rebalancing; %d entries in state so far", len(state))
        return
    n, b = stats["events"], max(stats["batches"], 1)
    log.info("label_joiner: %d events in %d batches (join %.1f ms, write %.1f ms per batch); %d entries in "
             "state, idle %s, watermarks %s, %s", n, stats["batches"], 1000 * stats["join_s"] / b,
             1000 * stats["write_s"] / b, len(state), joiner.idle(), joiner.watermarks(), dict(joiner.counts))
    stats.clear()
