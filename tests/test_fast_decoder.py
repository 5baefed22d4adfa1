"""The compiled decoder accepts and rejects exactly what the pydantic codec does (pure logic, no broker)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import msgspec
import orjson
import pytest

from infra.settings import get_settings
from schemas.codec import InvalidEvent, decode, schema_headers
from schemas.events import (
    ALL_EVENTS,
    Campaign,
    Click,
    Conversion,
    DeadLetter,
    Impression,
    MaturedLabel,
    NegativeFeedback,
    PredictionLog,
    TrainingExample,
)
from schemas.fast import STRUCTS, FastDecoder, to_dict
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate

DECODERS = {cls: FastDecoder(cls) for cls in ALL_EVENTS}

# One valid record per event (test data; the pydantic model checks it in test_base_records_are_valid).
BASE = {
    Impression: {"impression_id": "i", "request_id": "r", "user_id": 1, "ad_id": 2, "advertiser_id": 3,
                 "campaign_id": 4, "placement": "feed", "position": 3, "device": "mobile", "bid": 0.5,
                 "event_time_ms": 5, "model_version": "v", "served_pctr": 0.1, "served_pcvr": 0.01,
                 "feature_ref": "r:2"},
    Click: {"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2, "event_time_ms": 5},
    Conversion: {"conversion_id": "v", "click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2,
                 "event_time_ms": 5, "value": 9.5},
    NegativeFeedback: {"feedback_id": "f", "impression_id": "i", "user_id": 1, "ad_id": 2, "kind": "hide",
                       "event_time_ms": 5},
    PredictionLog: {"request_id": "r", "impression_id": "i", "user_id": 1, "ad_id": 2, "model_version": "v",
                    "event_time_ms": 5, "features": {"ctr_1h": 0.2, "n": 3}, "pctr": 0.1, "pcvr": 0.01},
    TrainingExample: {"example_id": "e", "impression_id": "i", "user_id": 1, "ad_id": 2, "advertiser_id": 3,
                      "campaign_id": 4, "placement": "feed", "position": 0, "device": "m", "model_version": "v",
                      "impression_time_ms": 0, "clicked": True, "converted": False, "scheme": "naive",
                      "label_ctr": 1, "label_ctcvr": 0.5, "weight": 1.0, "as_of_ms": 0},
    MaturedLabel: {"impression_id": "i", "user_id": 1, "ad_id": 2, "advertiser_id": 3, "campaign_id": 4,
                   "impression_time_ms": 0, "clicked": True, "converted": False},
    Campaign: {"campaign_id": 4, "advertiser_id": 1, "category_id": 7, "daily_budget": 300.0, "start_time_ms": 0,
               "event_time_ms": 5},
    DeadLetter: {"dead_letter_id": "d", "source_topic": "clicks", "partition": -1, "offset": -1, "stage": "s",
                 "reason": "not JSON: x", "payload": "{", "arrival_ms": -1},
}


def outcome(how: str, cls, value, headers=None):
    """(repr of the fields, None) when accepted, (None, reason kind) when rejected; repr tells 1 from 1.0."""
    try:
        if how == "pydantic":
            got = decode(cls, value, headers).model_dump()
        else:
            got = DECODERS[cls].decode_dict(value, headers)
    except InvalidEvent as exc:
        return None, str(exc).split(":", 1)[0]
    return repr(got), None


def both(cls, value, headers=None):
    """The pydantic outcome, after asserting the compiled decoder's is the same."""
    a, b = outcome("pydantic", cls, value, headers), outcome("fast", cls, value, headers)
    assert a == b, (value, a, b)
    return a


def record(cls, **change) -> bytes:
    return orjson.dumps({**BASE[cls], **change})


def test_simulated_events_decode_alike():
    cfg = SimulatorConfig(hours=0.2, users=2000, ads=500, speed=0, malformed_share=0.05, seed=3,
                          start=datetime(2026, 11, 1, tzinfo=UTC))
    gen = generate(cfg, get_settings(), drain=True)
    cls_of = {topic: cls for cls, topic in gen.schedule.topics.items()}
    seen = Counter()
    for topic, _key, value, headers, _when in iter_messages(gen.schedule):
        fields, kind = both(cls_of[topic], value, headers)
        seen[kind or f"accepted {cls_of[topic].NAME}"] += 1
    assert seen["not JSON"] > 10 and seen["invalid impression"] > 10 and seen["accepted impression"] > 1000
    assert {"accepted click", "accepted conversion", "accepted prediction_log"} <= set(seen)


def test_base_records_are_valid():
    for cls in ALL_EVENTS:
        fields, kind = both(cls, record(cls))
        assert kind is None, cls


def test_structs_mirror_the_models():
    for cls, struct in STRUCTS.items():
        fields = msgspec.structs.fields(struct)
        assert [f.name for f in fields] == list(cls.model_fields)
        for f in fields:
            info = cls.model_fields[f.name]
            assert f.required == info.is_required(), (cls, f.name)
            if info.default_factory is not None:  # e.g. PredictionLog.feature_lists: a fresh {} per record
                assert f.default_factory is info.default_factory, (cls, f.name)
            else:
                assert f.required or f.default == info.default
    assert STRUCTS[Click].__struct_config__.frozen


def test_defaults_are_filled_and_returned_as_the_struct():
    got = DECODERS[MaturedLabel].decode(record(MaturedLabel))
    assert isinstance(got, STRUCTS[MaturedLabel])
    assert to_dict(got) == MaturedLabel(**BASE[MaturedLabel]).model_dump()
    assert to_dict(got)["conversion_value"] == 0.0 and to_dict(got)["click_time_ms"] is None


# (class, change, expected reason kind or None when accepted): written out, so both decoders cannot be wrong alike.
CASES = [
    (Click, {"user_id": 0}, None),  # ge bound itself
    (Click, {"user_id": -1}, "invalid click"),
    (DeadLetter, {"partition": -1, "offset": -1, "arrival_ms": -1}, None),  # ge=-1
    (DeadLetter, {"offset": -2}, "invalid dead_letter"),
    (Impression, {"position": 100}, None),  # le bound itself
    (Impression, {"position": 101}, "invalid impression"),
    (Impression, {"served_pctr": 1.0}, None),
    (Impression, {"served_pctr": 1.0000001}, "invalid impression"),
    (Impression, {"served_pcvr": -0.0}, None),
    (Impression, {"bid": -0.01}, "invalid impression"),
    (TrainingExample, {"delay_cdf": 1.5}, "invalid training_example"),  # bounds on an optional field
    (TrainingExample, {"delay_cdf": None, "click_time_ms": None}, None),  # null for optional
    (TrainingExample, {"elapsed_since_click_s": -1.0}, "invalid training_example"),
    (TrainingExample, {"click_time_ms": 7, "elapsed_since_click_s": 0}, None),
    (Click, {"click_id": ""}, "invalid click"),  # min_length
    (Click, {"click_id": "é"}, None),  # one code point
    (Impression, {"model_version": ""}, None),  # no min_length on this one
    (Click, {"user_id": "1"}, "invalid click"),  # strict: no str -> int
    (Click, {"user_id": 1.0}, "invalid click"),  # strict: no float -> int
    (Click, {"user_id": True}, "invalid click"),  # bool is not an int
    (TrainingExample, {"clicked": 1}, "invalid training_example"),  # int is not a bool
    (TrainingExample, {"is_correction": "true"}, "invalid training_example"),
    (Conversion, {"value": 3}, None),  # int for float, as pydantic strict allows
    (NegativeFeedback, {"kind": "report"}, None),
    (NegativeFeedback, {"kind": "like"}, "invalid negative_feedback"),  # not one of the kinds
    (NegativeFeedback, {"kind": 1}, "invalid negative_feedback"),
    (TrainingExample, {"label_neg": 1.0}, None),
    (TrainingExample, {"label_neg": 2.0}, "invalid training_example"),
    (Conversion, {"value": "3.0"}, "invalid conversion"),
    (TrainingExample, {"label_ctr": 1, "weight": 2}, None),
    (PredictionLog, {"features": {"a": 1, "b": -2.5}}, None),
    (PredictionLog, {"features": {"a": "x"}}, "invalid prediction_log"),
    (PredictionLog, {"features": {"a": None}}, "invalid prediction_log"),
    (PredictionLog, {"features": [1.0]}, "invalid prediction_log"),
    (Click, {"event_time_ms": None}, "invalid click"),  # null for required
    (Click, {"impression_id": 5}, "invalid click"),
    (Click, {"extra": "ignored", "nested": {"a": [1, {"b": None}]}}, None),  # extra keys ignored
    (Click, {"ad_id": 2**63 - 1}, None),
    (Click, {"ad_id": 2**63}, None),  # orjson reads uint64 as int: the compiled path hands it over
    (Click, {"ad_id": 2**64 - 1}, None),
    (Click, {"event_time_ms": -(2**63)}, "invalid click"),
    (TrainingExample, {"click_time_ms": -(2**63)}, None),  # unconstrained int: int64 minimum
]


@pytest.mark.parametrize("cls,change,expected", CASES)
def test_edge_cases(cls, change, expected):
    fields, kind = both(cls, record(cls, **change))
    assert kind == expected


@pytest.mark.parametrize("cls", ALL_EVENTS)
def test_every_required_field_missing_and_every_field_wrong_typed(cls):
    for name, info in cls.model_fields.items():
        without = orjson.dumps({k: v for k, v in BASE[cls].items() if k != name})
        assert both(cls, without)[1] == (f"invalid {cls.NAME}" if info.is_required() else None), name
        assert both(cls, record(cls, **{name: [1]}))[1] == f"invalid {cls.NAME}", name


RAW = b'{"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2, "event_time_ms": 5%s}'


@pytest.mark.parametrize("value,expected", [
    (RAW % b', "ad_id": 18446744073709551616', "invalid click"),  # beyond uint64: orjson reads a float
    (RAW % b', "user_id": -9223372036854775809', "invalid click"),
    (RAW % b', "user_id": -1, "user_id": 1', None),  # duplicate keys: the last one counts
    (RAW % b', "user_id": 1, "user_id": -1', "invalid click"),
    (RAW % b', "click_id": "a", "click_id": ""', "invalid click"),
    (RAW % b', "user_id": -1, oops', "not JSON"),  # bad field before a syntax error
    (RAW % b'} trailing', "not JSON"),
    (RAW % b', "x": NaN', "not JSON"),
    (RAW % b', "x": "\xff"', "not JSON"),  # invalid UTF-8 in an ignored key
    (RAW % b', "click_id": "\xff"', "not JSON"),
    (RAW % b', "click_id": "\xed\xa0\x80"', "not JSON"),  # UTF-8 encoded surrogate
    (RAW % b', "x": "\\ud800"', "not JSON"),  # lone surrogate escape
    (RAW % b', "click_id": "\\udc00"', "not JSON"),
    (RAW % b', "click_id": "\\ud83d\\ude00"', None),  # escaped pair
    (RAW % b', "x": "\\q"', "not JSON"),
    (RAW % b', "\\u0063lick_id": ""', "invalid click"),  # escaped key name
    (RAW % b', "x": [1,]', "not JSON"),
    (RAW % b', "x": 01', "not JSON"),
    (RAW % (b', "x": ' + b"[" * 990 + b"]" * 990), None),
    (RAW % (b', "x": ' + b"[" * 1010 + b"]" * 1010), None),  # msgspec's limit is lower: orjson decides
    (RAW % (b', "x": ' + b"[" * 1100 + b"]" * 1100), "not JSON"),  # orjson's depth limit
    (b'{"request_id": "r", "impression_id": "i", "user_id": 1, "ad_id": 2, "model_version": "v", '
     b'"event_time_ms": 5, "features": {"a": 1e400}, "pctr": 0.1, "pcvr": 0.01}', "not JSON"),
    (b"\xef\xbb\xbf" + RAW % b"", "not JSON"),  # byte order mark
    (b"  " + RAW % b"" + b"\n", None),
    (b"", "not JSON"),
    (b"{nope", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"click"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"{}", "invalid click"),
])
def test_json_quirks(value, expected):
    assert both(Click, value)[1] == expected


@pytest.mark.parametrize("value,headers,expected", [
    (None, None, "empty value (tombstone)"),
    (None, schema_headers(Impression), "empty value (tombstone)"),  # tombstone first
    (record(Click), schema_headers(Click), None),
    (record(Click), [("schema", b"click/v0"), ("trace", b"x")], None),  # older versions are read
    (record(Click), [("trace", b"x")], None),
    (record(Click), schema_headers(Impression), "wrong schema"),
    (b"{nope", schema_headers(Impression), "wrong schema"),  # header before JSON
    (record(Click), [("schema", b"click/v2")], "unsupported schema version"),
    (record(Click), [("schema", b"click/vX")], "unsupported schema version"),
    (record(Click), [("schema", b"click")], "unsupported schema version"),
])
def test_headers_and_tombstones(value, headers, expected):
    assert both(Click, value, headers)[1] == expected


def test_reason_names_the_field():
    with pytest.raises(InvalidEvent, match=r"^invalid click: user_id: "):
        DECODERS[Click].decode(record(Click, user_id=-1))
    with pytest.raises(InvalidEvent, match=r"^invalid click: ad_id: Field required"):
        DECODERS[Click].decode(orjson.dumps({k: v for k, v in BASE[Click].items() if k != "ad_id"}))
    with pytest.raises(InvalidEvent, match=r"^not JSON: "):
        DECODERS[Click].decode(b"{nope")


def test_floats_parse_to_the_same_double():
    values = [0.1, 1 / 3, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 123456.789e-10, 0.30000000000000004]
    texts = [repr(v).encode() for v in values] + [b"0.1000000000000000055511151231257827", b"9007199254740993",
                                                 b"1e-400", b"0.49999999999999994"]
    for text in texts:
        value = b'{"features": {"x": %s, "y": -%s}, "request_id": "r", "impression_id": "i", "user_id": 1, ' \
                b'"ad_id": 2, "model_version": "v", "event_time_ms": 5, "pctr": 0.1, "pcvr": 0.01}' % (text, text)
        fields, kind = both(PredictionLog, value)
        assert kind is None, text


def test_known_difference_overflowing_number_in_an_ignored_key():
    """msgspec skips an ignored key's value unread; orjson rejects a number beyond double range anywhere."""
    value = RAW % b', "x": 1e400'
    assert outcome("pydantic", Click, value)[1] == "not JSON"
    assert outcome("fast", Click, value)[1] is None
