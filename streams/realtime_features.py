"""Real-time features per user, ad and advertiser, over event time, on the stream engine.

Two stages, because the raw topics are keyed by impression and the features by entity:

1. :class:`FanOut` (input: impressions, clicks; key: impression id) drops repeated events (an impression
   or a click on it counts once; ids remembered ``done_retention_s``), dead-letters bad ones, and sends
   one small entity event per entity an event touches to ``realtime_entity_events``, keyed
   ``user:<id>`` / ``ad:<id>`` / ``advertiser:<id>`` (partition: crc32 of the key).
2. :class:`EntityFeatures` (input: ``realtime_entity_events``; key: entity) keeps per entity the
   impression and click counts in 5-minute buckets of event time over the last 24 h, the session and the
   ads seen last; after each batch it writes every touched entity's row (``schemas.features``
   ``UserRealtime``, ``AdRealtime``, ``AdvertiserRealtime``) to the online store in Feast's layout
   (``feature_repo.online.OnlineWriter``) and to the ``realtime_features`` topic (the offline log).

Windows (1 h / 6 h / 24 h) end at the entity's newest event time, which is the row's ``event_timestamp``;
their start is exact to one bucket (5 min). A late event inside 24 h lands in its bucket; an older one
is counted out (``too late``). Online writes are idempotent: a replay after a crash recomputes the same
rows from the restored state and writes them again.
"""

from __future__ import annotations

import zlib
from collections import Counter
from datetime import UTC, datetime

import orjson
from aiokafka.structs import ConsumerRecord

from infra.settings import Settings
from label_joiner.rules import Rules
from schemas.codec import InvalidEvent, encode
from schemas.events import Click, Impression
from schemas.fast import FastDecoder
from schemas.features import RECENT_ADS, AdRealtime, AdvertiserRealtime, FeatureRow, UserRealtime
from streams.dead_letter import make_dead_letter
from streams.engine import Outbox
from streams.state import META, Store

CLOCK = META + "clock"  # the newest time this task has seen (arrival for stage 1, event time for stage 2)


def advance_clock(store: Store, t: int) -> int:
    clock = store.get(CLOCK)
    if clock is None or t > clock["t"]:
        store.put(CLOCK, {"t": t})
        return t
    return clock["t"]


def forget_due(store: Store) -> None:
    """Delete the records whose due time the task's own clock has passed (never by the wall clock, so a
    replay of old data forgets exactly what the live run forgot)."""
    clock = store.get(CLOCK)
    if clock is None:
        return
    for key in store.due(clock["t"]):
        record = store.get(key)
        if record is not None and record.get("d", clock["t"]) < clock["t"]:
            store.delete(key)

BUCKET_MS = 5 * 60_000
HORIZON_MS = 24 * 3_600_000
SESSION_GAP_MS = 30 * 60_000
WINDOWS = {"1h": 3_600_000, "6h": 6 * 3_600_000, "24h": 24 * 3_600_000}
TABLE_OF_KIND = {"user": UserRealtime, "ad": AdRealtime, "advertiser": AdvertiserRealtime}
FANOUT_STAGE, FEATURES_STAGE = "realtime_fanout", "realtime_features"
MAX_EVENT_BYTES = 64 * 1024


def dead_letter(out: Outbox, dead_topic: str, r: ConsumerRecord, partition: int, stage: str, reason: str) -> None:
    """Write ``r`` to the dead-letter topic with its reason (cut to 500 characters)."""
    out.add(dead_topic, *encode(make_dead_letter(r.topic, partition, r.offset, stage, reason[:500], r.value,
                                                 r.timestamp)))


def entity_partition(key: bytes, partitions: int) -> int:
    """The partition of an entity key in ``realtime_entity_events`` (stable across processes and versions)."""
    return zlib.crc32(key) % partitions


class FanOut:
    """Stage 1: dedupe and re-key impressions and clicks by entity."""

    def __init__(self, settings: Settings, partition: int, store: Store):
        t = settings.topics
        self.partition, self.store = partition, store
        self.inputs = {t.impressions: Impression, t.clicks: Click}
        self.decoders = {topic: FastDecoder(cls) for topic, cls in self.inputs.items()}
        self.out_topic, self.dead_topic = t.realtime_entity_events, t.dead_letters
        self.out_partitions = settings.kafka.default_partitions
        self.retention_ms = int(settings.windows.done_retention_s * 1000)
        self.rules = Rules.from_settings(settings.windows)
        self.counts: Counter[str] = Counter()

    def _first_time(self, key: str, arrival: int) -> bool:
        if self.store.get(key) is not None:
            self.counts["repeated"] += 1
            return False
        self.store.put(key, {"d": arrival + self.retention_ms})
        return True

    def _send(self, out: Outbox, key: str, event: dict) -> None:
        raw = key.encode()
        out.add(self.out_topic, raw, orjson.dumps(event), partition=entity_partition(raw, self.out_partitions))

    def _decode(self, r: ConsumerRecord) -> dict:
        """The record's event, or :class:`InvalidEvent` with the reason (too large, invalid, implausible time)."""
        if r.value is not None and len(r.value) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event too large: {len(r.value):,} bytes")
        e = self.decoders[r.topic].decode_dict(r.value, r.headers)
        problem = self.rules.event_time_problem(e["event_time_ms"], r.timestamp)
        if problem is not None:  # the joiner's rule: such a time would poison every entity's windows
            raise InvalidEvent(f"{problem}: event time {e['event_time_ms']} vs record time {r.timestamp}")
        return e

    def _dead(self, out: Outbox, r: ConsumerRecord, reason: str) -> None:
        self.counts[reason.split(":", 1)[0]] += 1
        dead_letter(out, self.dead_topic, r, self.partition, FANOUT_STAGE, reason)

    def process(self, records: list[ConsumerRecord], out: Outbox) -> None:
        newest = None
        for r in records:
            try:
                e = self._decode(r)
            except InvalidEvent as exc:
                self._dead(out, r, str(exc))
                continue
            except Exception as exc:  # one record's failure is its dead letter, never a crash loop
                self._dead(out, r, f"undecodable: {type(exc).__name__}: {exc}")
                continue
            newest = r.timestamp if newest is None else max(newest, r.timestamp)  # valid records move the clock
            self._fan_out(out, self.inputs[r.topic], e, r.timestamp)
        if newest is not None:
            advance_clock(self.store, newest)

    def _fan_out(self, out: Outbox, cls: type, e: dict, arrival: int) -> None:
        t = e["event_time_ms"]
        if cls is Impression:
            if not self._first_time(f"i:{e['impression_id']}", arrival):
                return
            seen = {"k": "i", "t": t, "ad": e["ad_id"], "adv": e["advertiser_id"]}
            self._send(out, f"user:{e['user_id']}", seen)
            self._send(out, f"ad:{e['ad_id']}", {"k": "i", "t": t})
            self._send(out, f"advertiser:{e['advertiser_id']}", {"k": "i", "t": t})
        else:
            if not self._first_time(f"c:{e['impression_id']}", arrival):
                return  # a second click on one impression counts once
            self._send(out, f"user:{e['user_id']}", {"k": "c", "t": t})
            self._send(out, f"ad:{e['ad_id']}", {"k": "c", "t": t})
        self.counts[cls.NAME] += 1

    def advance(self, idle_topics: set[str], wall_ms: int, out: Outbox) -> None:
        forget_due(self.store)  # ids older than the retention


MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time a datetime can hold


def entity_event(kind: str, e: object) -> dict:
    """``e`` if it is a well-formed entity event of ``kind`` (checked before any state changes), else ValueError."""
    if not isinstance(e, dict) or e.get("k") not in ("i", "c"):
        raise ValueError("not an entity event")
    if not (type(e.get("t")) is int and 0 <= e["t"] <= MAX_TIME_MS):
        raise ValueError(f"event time out of range: {str(e.get('t'))[:40]}")
    if kind == "user" and e["k"] == "i" and not (type(e.get("ad")) is int and type(e.get("adv")) is int):
        raise ValueError("a user's impression event without its ad and advertiser")
    return e


def feature_row(kind: str, entity_id: int, state: dict) -> dict:
    """The feature row of one entity from its state (pure: the same state gives the same row)."""
    newest = state["t"]
    row: dict = {"event_timestamp": datetime.fromtimestamp(newest / 1000, UTC), f"{kind}_id": entity_id}
    buckets = {int(b): v for b, v in state["b"].items()}
    for name, span in WINDOWS.items():
        first = newest - span
        imps = sum(v[0] for b, v in buckets.items() if b + BUCKET_MS > first)
        clicks = sum(v[1] for b, v in buckets.items() if b + BUCKET_MS > first)
        row[f"{kind}_impressions_{name}"] = imps
        row[f"{kind}_clicks_{name}"] = clicks
    if kind == "user":
        row["user_session_depth"] = state["depth"]
        recent = state["recent"]
        row["user_recent_ad_ids"] = [a for a, _, _ in recent]
        row["user_recent_advertiser_ids"] = [v for _, v, _ in recent]
        row["user_recent_seen_ms"] = [s for _, _, s in recent]
    table = TABLE_OF_KIND[kind]
    return {k: row[k] for k in table.model_fields}


class EntityFeatures:
    """Stage 2: per-entity windows; rows to the online store and the feature log."""

    def __init__(self, settings: Settings, partition: int, store: Store, writer=None):
        from feature_repo.online import OnlineWriter

        self.partition, self.store = partition, store
        self.writer = writer or OnlineWriter(settings)
        self.log_topic, self.dead_topic = settings.topics.realtime_features, settings.topics.dead_letters
        self.counts: Counter[str] = Counter()

    def _update(self, kind: str, state: dict | None, e: dict) -> dict:
        t = e["t"]
        state = state or {"t": t, "b": {}, "depth": 0, "last": t, "recent": []}
        newest = max(state["t"], t)
        if t <= newest - HORIZON_MS:
            self.counts["too late"] += 1
            return state
        bucket = str(t - t % BUCKET_MS)
        counts = state["b"].setdefault(bucket, [0, 0])
        counts[0 if e["k"] == "i" else 1] += 1
        state["b"] = {b: v for b, v in state["b"].items() if int(b) + BUCKET_MS > newest - HORIZON_MS}
        if kind == "user" and e["k"] == "i":
            state["depth"] = 1 if t - state["last"] > SESSION_GAP_MS else state["depth"] + 1
            state["last"] = max(state["last"], t)
            recent = state["recent"] + [[e["ad"], e["adv"], t]]
            state["recent"] = sorted(recent, key=lambda x: -x[2])[:RECENT_ADS]
        state["t"] = newest
        state["d"] = newest + HORIZON_MS  # an entity quiet for a day is forgotten (its windows are empty)
        return state

    def process(self, records: list[ConsumerRecord], out: Outbox) -> None:
        touched: dict[str, dict] = {}
        for r in records:
            try:
                key = r.key.decode()
                kind, entity = key.split(":", 1)
                if kind not in TABLE_OF_KIND or not entity.isdigit():
                    raise ValueError(f"unknown entity key {key[:80]!r}")
                event = entity_event(kind, orjson.loads(r.value))
                state = self._update(kind, touched.get(key) or self.store.get(key), event)
            except Exception as exc:  # one record's failure is its dead letter, never a crash loop
                self.counts["undecodable entity event"] += 1
                dead_letter(out, self.dead_topic, r, self.partition, FEATURES_STAGE,
                            f"undecodable entity event: {type(exc).__name__}: {exc}")
                continue
            touched[key] = state
            advance_clock(self.store, event["t"])
        rows: dict[type[FeatureRow], list[dict]] = {}
        for key, state in touched.items():
            self.store.put(key, state)
            kind, entity = key.split(":", 1)
            row = feature_row(kind, int(entity), state)
            rows.setdefault(TABLE_OF_KIND[kind], []).append(row)
            log = {**row, "event_timestamp": int(state["t"])}
            out.add(self.log_topic, key.encode(), orjson.dumps(log), [("view", TABLE_OF_KIND[kind].VIEW.encode())],
                    partition=self.partition)
        for table, batch in rows.items():
            self.writer.write(table, batch)
            self.counts[f"{table.VIEW} rows"] += len(batch)

    def advance(self, idle_topics: set[str], wall_ms: int, out: Outbox) -> None:
        forget_due(self.store)  # entities quiet for a day (their windows are empty)
