"""Every record type survives a round trip through the real broker; bad input becomes a dead letter."""

from __future__ import annotations

import orjson
import pytest
from kafka import KafkaProducer

from schemas import (
    ALL_EVENTS,
    Campaign,
    Click,
    Conversion,
    DeadLetter,
    Impression,
    InvalidEvent,
    MaturedLabel,
    NegativeFeedback,
    PredictionLog,
    TrainingExample,
    decode,
    encode,
)
from schemas.faust_records import faust_record
from schemas.spark import spark_schema
from streams.dead_letter import DeadLetterSink
from tests.conftest import consume_all

T0 = 1_793_577_600_000

SAMPLES = [
    Impression(impression_id="i1", request_id="r1", user_id=1, ad_id=2, advertiser_id=3, campaign_id=4,
               placement="feed", position=0, device="mobile", bid=1.25, event_time_ms=T0,
               model_version="m1", served_pctr=0.03, served_pcvr=0.01, feature_ref="i1"),
    Click(click_id="c1", impression_id="i1", user_id=1, ad_id=2, event_time_ms=T0 + 3000),
    Conversion(conversion_id="v1", click_id="c1", impression_id="i1", user_id=1, ad_id=2,
               event_time_ms=T0 + 60_000, value=12.5),
    NegativeFeedback(feedback_id="f1", impression_id="i1", user_id=1, ad_id=2, kind="report",
                     event_time_ms=T0 + 4000),
    PredictionLog(request_id="r1", impression_id="i1", user_id=1, ad_id=2, model_version="m1",
                  event_time_ms=T0, features={"position": 0.0, "bid": 1.25}, pctr=0.03, pcvr=0.01),
    TrainingExample(example_id="i1/click/c1", impression_id="i1", user_id=1, ad_id=2, advertiser_id=3,
                    campaign_id=4, placement="feed", position=0, device="mobile", model_version="m1",
                    impression_time_ms=T0, clicked=True, converted=False, scheme="fnw", label_ctr=1.0,
                    label_ctcvr=0.0, weight=0.97,
                    as_of_ms=T0 + 5000, click_time_ms=T0 + 3000, elapsed_since_click_s=2.0,
                    delay_cdf=0.01, label_neg=None),
    MaturedLabel(impression_id="i1", user_id=1, ad_id=2, advertiser_id=3, campaign_id=4,
                 impression_time_ms=T0, clicked=True, converted=True, click_time_ms=T0 + 3000,
                 conversion_time_ms=T0 + 60_000, conversion_value=12.5, negative_feedback=True),
    Campaign(campaign_id=4, advertiser_id=1, category_id=7, daily_budget=300.0, start_time_ms=T0 - 86_400_000,
             event_time_ms=T0),
    DeadLetter(dead_letter_id="test/clicks/0/7", source_topic="clicks", partition=0, offset=7, stage="test",
               reason="not JSON: x", payload="{", arrival_ms=T0),
]


def test_samples_cover_every_schema():
    assert {type(s) for s in SAMPLES} == set(ALL_EVENTS)


def test_round_trip_through_broker(fresh_topics):
    kafka_settings = fresh_topics
    topic = kafka_settings.topics.training_examples  # any topic works; values carry their schema header
    producer = KafkaProducer(**kafka_settings.kafka.client_config(), acks="all")
    for event in SAMPLES:
        key, value, headers = encode(event)
        producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()
    records = consume_all(kafka_settings, topic, len(SAMPLES))
    by_schema = {dict(r.headers)["schema"].decode(): r for r in records}
    for event in SAMPLES:
        record = by_schema[event.schema_id()]
        assert record.key == event.key().encode()
        assert decode(type(event), record.value, record.headers) == event


@pytest.mark.parametrize("payload, reason", [
    (b"{truncated", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (orjson.dumps({"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2}), "event_time_ms: Field required"),
    (orjson.dumps({"click_id": "c", "impression_id": "i", "user_id": "x", "ad_id": 2, "event_time_ms": 1}),
     "user_id: Input should be a valid integer"),
    (orjson.dumps({"click_id": "c", "impression_id": "i", "user_id": 1, "ad_id": 2, "event_time_ms": -1}),
     "event_time_ms: Input should be greater than or equal to 0"),
])
def test_invalid_payload_reason(payload, reason):
    with pytest.raises(InvalidEvent, match=reason):
        decode(Click, payload)


def test_wrong_schema_header_is_rejected():
    _, value, headers = encode(SAMPLES[1])
    with pytest.raises(InvalidEvent, match="wrong schema"):
        decode(Impression, value, headers)
    with pytest.raises(InvalidEvent, match="unsupported schema version"):
        decode(Click, value, [("schema", b"click/v9")])


def test_malformed_event_reaches_dead_letter_topic(fresh_topics):
    kafka_settings = fresh_topics
    t = kafka_settings.topics
    good_key, good_value, good_headers = encode(SAMPLES[1])
    bad = [b"{not json", orjson.dumps({"click_id": "c2", "impression_id": "i2", "user_id": -3, "ad_id": 2,
                                      "event_time_ms": T0})]
    producer = KafkaProducer(**kafka_settings.kafka.client_config(), acks="all")
    producer.send(t.clicks, key=good_key, value=good_value, headers=good_headers)
    for value in bad:
        producer.send(t.clicks, key=b"i2", value=value, headers=good_headers)
    producer.flush()
    producer.close()

    sink = DeadLetterSink(kafka_settings, stage="test-validate")
    decoded = [sink.decode(Click, r) for r in consume_all(kafka_settings, t.clicks, 3)]
    sink.flush()
    assert [d for d in decoded if d is not None] == [SAMPLES[1]]
    assert sink.counts == {"not JSON": 1, "invalid click": 1}

    letters = [decode(DeadLetter, r.value, r.headers) for r in consume_all(kafka_settings, t.dead_letters, 2)]
    assert {dl.source_topic for dl in letters} == {t.clicks}
    assert {dl.stage for dl in letters} == {"test-validate"}
    reasons = sorted(dl.reason for dl in letters)
    assert reasons[0].startswith("invalid click: user_id: Input should be greater than or equal to 0")
    assert reasons[1].startswith("not JSON")
    assert sorted(dl.payload for dl in letters) == sorted(v.decode() for v in bad)


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda c: c.NAME)
def test_derived_schemas_list_the_same_fields(cls):
    assert [f.name for f in spark_schema(cls).fields] == cls.field_names()
    assert list(faust_record(cls)._options.fields) == cls.field_names()


def test_spark_schema_nullability():
    schema = {f.name: f for f in spark_schema(TrainingExample).fields}
    assert schema["click_time_ms"].nullable and not schema["impression_id"].nullable
    assert schema["clicked"].dataType.typeName() == "boolean"
