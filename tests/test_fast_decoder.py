"""The compiled decoder accepts and rejects exactly what the pydantic codec does (pure logic, no broker)."""

from __future__ import annotations

import orjson
import pytest

from infra.settings import get_settings
from schemas.codec import InvalidEvent, decode, schema_headers
from schemas.events import ALL_EVENTS, Click, Impression, TrainingExample
from schemas.fast import FastDecoder
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate


def outcome(decoder, cls, value, headers):
    """(fields, None) when accepted, (None, reason kind) when rejected."""
    try:
        got = decoder(cls, value, headers)
    except InvalidEvent as exc:
        return None, str(exc).split(":", 1)[0]
    return got, None


def pydantic_way(cls, value, headers):
    return decode(cls, value, headers).model_dump()


def fast_way(cls, value, headers):
    return FastDecoder(cls).decode_dict(value, headers)


def test_simulated_events_decode_alike():
    gen = generate(SimulatorConfig(hours=0.2, users=2000, ads=500, speed=0, malformed_share=0.05, seed=3,
                                   start="2026-11-01T00:00:00Z"), get_settings(), drain=True)
    cls_of = {topic: cls for cls, topic in gen.schedule.topics.items()}
    seen = {"accepted": 0, "rejected": 0}
    for topic, _key, value, headers, _when in iter_messages(gen.schedule):
        cls = cls_of[topic]
        a, b = outcome(pydantic_way, cls, value, headers), outcome(fast_way, cls, value, headers)
        assert a == b, (value, a, b)
        seen["accepted" if a[0] is not None else "rejected"] += 1
    assert seen["accepted"] > 1000 and seen["rejected"] > 20


CLICK = {"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2, "event_time_ms": 5}


@pytest.mark.parametrize("change", [
    {"user_id": -1}, {"user_id": "1"}, {"user_id": 1.0}, {"user_id": True}, {"click_id": ""},
    {"event_time_ms": None}, {"extra": "ignored"}, {"ad_id": 2**40},
])
def test_edge_cases_decode_alike(change):
    value = orjson.dumps({**CLICK, **change})
    assert outcome(pydantic_way, Click, value, None) == outcome(fast_way, Click, value, None)


@pytest.mark.parametrize("value,headers", [
    (None, None), (b"[1, 2]", None), (b"{nope", None), (orjson.dumps(CLICK), schema_headers(Impression)),
    (orjson.dumps(CLICK), [("schema", b"click/v9")]), (orjson.dumps({k: v for k, v in CLICK.items() if k != "ad_id"}),
                                                        None),
])
def test_bad_input_has_the_same_reason_kind(value, headers):
    a, b = outcome(pydantic_way, Click, value, headers), outcome(fast_way, Click, value, headers)
    assert a[0] is None and a == b


def test_optional_fields_floats_and_probabilities():
    ex = {"example_id": "e", "impression_id": "i", "user_id": 1, "ad_id": 2, "advertiser_id": 3, "campaign_id": 4,
          "placement": "feed", "position": 0, "device": "m", "model_version": "v", "impression_time_ms": 0,
          "clicked": True, "converted": False, "scheme": "naive", "label_ctr": 1, "label_ctcvr": 0.5, "weight": 1.0,
          "as_of_ms": 0}
    for change in ({}, {"label_ctcvr": 1.5}, {"delay_cdf": None}, {"click_time_ms": 7}, {"clicked": 1}):
        value = orjson.dumps({**ex, **change})
        assert outcome(pydantic_way, TrainingExample, value, None) == outcome(fast_way, TrainingExample, value, None)


def test_every_event_has_a_struct():
    for cls in ALL_EVENTS:
        assert FastDecoder(cls)
