"""No record stops a worker: any input that cannot be decoded, validated or processed becomes a dead letter with
its reason, and the good records around it are still processed (the label joiner and both real-time stages,
driven without Kafka; the crash-loop cases a review found: odd ``schema`` headers, a missing header value, an
event time after year 9999, an event 400 days ahead)."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from infra.settings import Settings
from label_joiner.processor import JoinProcessor
from label_joiner.schemes import make_scheme
from schemas.codec import encode
from schemas.events import Click, DeadLetter, Impression
from streams.engine import Outbox
from streams.realtime_features import EntityFeatures, FanOut
from streams.state import MemoryStore
from tests.test_realtime_features import ListWriter

T0 = 1_790_000_000_000
SETTINGS = Settings()
TOPICS = SETTINGS.topics
BAD_HEADERS = [[("schema", "click/v²".encode())], [("schema", b"click/v" + b"9" * 5000)], [("schema", None)],
               [("schema", b"\xff\xfe")], [("schema", b"click/v1"), ("schema", b"impression/v1")]]


def rec(topic: str, key: bytes | None, value: bytes | None, ts: int, offset: int, headers=()) -> ConsumerRecord:
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=ts, timestamp_type=0, key=key,
                          value=value, checksum=None, serialized_key_size=len(key or b""),
                          serialized_value_size=len(value or b""), headers=tuple(headers))


def impression(i: int, t: int = T0) -> Impression:
    return Impression(impression_id=f"i{i}", request_id=f"r{i}", user_id=1, ad_id=2, advertiser_id=3, campaign_id=4,
                      placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=t, model_version="m",
                      served_pctr=0.1, served_pcvr=0.1, feature_ref=f"i{i}")


def click(i: int, t: int = T0 + 2_000) -> Click:
    return Click(click_id=f"c{i}", impression_id=f"i{i}", user_id=1, ad_id=2, event_time_ms=t)


def dead_letters(out: Outbox) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(v) for topic, _, v, _, _ in out.records if topic == TOPICS.dead_letters]


def with_bad_click_headers(offset0: int) -> list[ConsumerRecord]:
    """A good impression and click, then a click under each bad header, then another good pair."""
    recs = []
    for n, (event, topic) in enumerate([(impression(1), TOPICS.impressions), (click(1), TOPICS.clicks)]):
        k, v, h = encode(event)
        recs.append(rec(topic, k, v, T0 + 3_000, offset0 + n, h))
    for n, headers in enumerate(BAD_HEADERS):
        k, v, _ = encode(click(100 + n))
        recs.append(rec(TOPICS.clicks, k, v, T0 + 3_000, offset0 + 10 + n, headers))
    for n, (event, topic) in enumerate([(impression(2), TOPICS.impressions), (click(2), TOPICS.clicks)]):
        k, v, h = encode(event)
        recs.append(rec(topic, k, v, T0 + 3_000, offset0 + 20 + n, h))
    return recs


def test_joiner_dead_letters_every_bad_header_and_keeps_the_good_records():
    proc = JoinProcessor(SETTINGS, make_scheme("naive", None, SETTINGS.windows.elapsed_windows_s), 0, MemoryStore())
    out = Outbox()
    proc.process(with_bad_click_headers(0), out)
    dead = dead_letters(out)
    assert len(dead) == len(BAD_HEADERS), [d.reason for d in dead]
    assert all(d.reason.startswith(("unsupported schema version", "schema header without a value", "wrong schema"))
               for d in dead), [d.reason for d in dead]
    examples = [orjson.loads(v) for topic, _, v, _, _ in out.records if topic == TOPICS.training_examples]
    assert sorted(e["impression_id"] for e in examples if e["clicked"]) == ["i1", "i2"]


def test_joiner_turns_a_processing_failure_into_a_dead_letter(monkeypatch):
    """A bug shown by one record (here forced) is that record's dead letter; the next record is joined."""
    proc = JoinProcessor(SETTINGS, make_scheme("naive", None, SETTINGS.windows.elapsed_windows_s), 0, MemoryStore())
    original = proc.join.on_event

    def flaky(source, event, *args):
        if event.get("impression_id") == "i1":
            raise OverflowError("a bug")
        return original(source, event, *args)

    monkeypatch.setattr(proc.join, "on_event", flaky)
    out = Outbox()
    recs = [rec(TOPICS.impressions, *encode(impression(i))[:2], T0 + 1_000, i, encode(impression(i))[2])
            for i in (1, 2)]
    proc.process(recs, out)
    dead = dead_letters(out)
    assert [d.reason for d in dead] == ["could not join: OverflowError: a bug"] and dead[0].offset == 1
    assert proc.join.store.get("i2") is not None


@pytest.mark.parametrize("event_time", [T0 + 400 * 86_400_000, 10**17])  # 400 days ahead; after year 9999
def test_fanout_dead_letters_an_implausible_time_and_keeps_its_clock(event_time):
    stage = FanOut(SETTINGS, 0, MemoryStore())
    out = Outbox()
    good_k, good_v, good_h = encode(impression(1))
    bad_k, bad_v, bad_h = encode(impression(2, t=event_time))
    stage.process([rec(TOPICS.impressions, good_k, good_v, T0 + 1_000, 0, good_h),
                   rec(TOPICS.impressions, bad_k, bad_v, T0 + 1_001, 1, bad_h)], out)
    dead = dead_letters(out)
    assert len(dead) == 1 and dead[0].reason.startswith("future event time"), [d.reason for d in dead]
    sent = [k for topic, k, _, _, _ in out.records if topic == TOPICS.realtime_entity_events]
    assert sorted(sent) == [b"ad:2", b"advertiser:3", b"user:1"]  # the good impression only
    stage.process([rec(TOPICS.impressions, *encode(impression(3))[:2], T0 + 2_000, 2, good_h)], Outbox())
    assert stage.store.get("i:i1") is not None  # the clock did not jump: nothing was forgotten


@pytest.mark.parametrize("key,value", [
    (b"ad:5", orjson.dumps({"k": "i", "t": 10**17})),  # after year 9999
    (b"ad:5", b"{not json"),
    (b"user:1", orjson.dumps({"k": "i", "t": T0})),  # a user's impression without its ad
    (b"planet:1", orjson.dumps({"k": "i", "t": T0})),
    (b"\xff", orjson.dumps({"k": "i", "t": T0})),
    (None, orjson.dumps({"k": "i", "t": T0})),
    (b"ad:5", None),
])
def test_entity_stage_dead_letters_a_bad_entity_event(key, value):
    writer = ListWriter()
    stage = EntityFeatures(SETTINGS, 0, MemoryStore(), writer=writer)
    out = Outbox()
    stage.process([rec(TOPICS.realtime_entity_events, b"ad:7", orjson.dumps({"k": "i", "t": T0}), T0, 0),
                   rec(TOPICS.realtime_entity_events, key, value, T0, 1),
                   rec(TOPICS.realtime_entity_events, b"ad:7", orjson.dumps({"k": "c", "t": T0 + 1}), T0, 2)], out)
    dead = dead_letters(out)
    assert len(dead) == 1 and dead[0].reason.startswith("undecodable entity event") and dead[0].offset == 1
    assert writer.rows[-1]["ad_id"] == 7 and writer.rows[-1]["ad_clicks_1h"] == 1
    assert all(r["ad_id"] == 7 for r in writer.rows)
