"""Fuzzed input through the real broker into both always-on workers (issue 18, item 4): Hypothesis makes records with
odd headers, keys and payloads (random bytes, valid events with one field replaced by any JSON value or dropped)
between good impressions and clicks. Neither the label joiner nor the real-time feature worker may exit; every good
record around the bad ones is still processed; every record that is not even a JSON object is a dead letter of each
worker that reads its topic."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infra.topics import read_topic
from label_joiner.worker import start_worker, stop_worker
from schemas import DeadLetter, MaturedLabel, decode
from schemas.codec import encode
from schemas.events import Click, Conversion, Impression
from tests.conftest import CLOSE_WHEN_IDLE

ROUNDS = 6  # Hypothesis examples, each a batch of fuzzed records between good ones
PER_ROUND = 25
NOW = int(time.time() * 1000) - 60_000  # every record is stamped here: the fuzz moves no clock

JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                        st.lists(st.integers(min_value=0, max_value=10), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(min_value=0, max_value=10), max_size=2))
HEADER_VALUES = st.one_of(st.none(), st.binary(max_size=40),
                          st.sampled_from([b"click/v1", b"impression/v1", b"conversion/v1", "click/v²".encode(),
                                           b"click/v" + b"9" * 5000, b"\xff\xfe", b"click/v-1"]))
HEADERS = st.lists(st.tuples(st.one_of(st.just("schema"), st.text(max_size=8)), HEADER_VALUES), max_size=3)
TOPICS = ("impressions", "clicks", "conversions")


def templates(tag: str) -> dict[str, dict]:
    """A valid event per input topic (ids that no good record uses)."""
    imp = Impression(impression_id=f"fz-{tag}", request_id=f"r-{tag}", user_id=1, ad_id=2, advertiser_id=3,
                     campaign_id=4, placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=NOW,
                     model_version="m", served_pctr=0.1, served_pcvr=0.1, feature_ref=f"fz-{tag}")
    clk = Click(click_id=f"fzc-{tag}", impression_id=f"fz-{tag}", user_id=1, ad_id=2, event_time_ms=NOW + 1_000)
    cnv = Conversion(conversion_id=f"fzv-{tag}", click_id=f"fzc-{tag}", impression_id=f"fz-{tag}", user_id=1, ad_id=2,
                     event_time_ms=NOW + 2_000, value=1.0)
    return {"impressions": imp.model_dump(), "clicks": clk.model_dump(), "conversions": cnv.model_dump()}


@st.composite
def fuzzed_record(draw) -> dict:
    topic = draw(st.sampled_from(TOPICS))
    template = templates(uuid.uuid4().hex[:10])[topic]
    kind = draw(st.sampled_from(["bytes", "replaced", "dropped", "wrong type"]))
    if kind == "bytes":
        value = draw(st.one_of(st.binary(max_size=200), st.just(b""), st.just(b"null"), st.just(b"[1, 2]")))
    elif kind == "replaced":
        field, new = draw(st.sampled_from(sorted(template))), draw(JSON_VALUES)
        value = orjson.dumps({**template, field: new})
    elif kind == "dropped":
        field = draw(st.sampled_from(sorted(template)))
        value = orjson.dumps({k: v for k, v in template.items() if k != field})
    else:
        value = orjson.dumps(draw(JSON_VALUES))
    return {"topic": topic, "key": draw(st.one_of(st.none(), st.binary(max_size=30))), "value": value,
            "headers": draw(HEADERS), "not_an_object": not _is_object(value)}


def _is_object(value: bytes) -> bool:
    try:
        return isinstance(orjson.loads(value), dict)
    except orjson.JSONDecodeError:
        return False


async def _produce(conf, plan) -> list[tuple[str, int, int]]:
    """Send the plan in order; return (topic, partition, offset) of the records that are not a JSON object."""
    producer = AIOKafkaProducer(**conf.kafka.aiokafka_config(), acks="all")
    await producer.start()
    bad = []
    try:
        for topic, key, value, headers, not_an_object in plan:
            meta = await producer.send_and_wait(topic, value=value, key=key, headers=headers, timestamp_ms=NOW)
            if not_an_object:
                bad.append((meta.topic, meta.partition, meta.offset))
    finally:
        await producer.stop()
    return bad


def test_fuzzed_records_stop_neither_worker(fresh_topics, redis_settings, tmp_path):
    conf = fresh_topics.model_copy(update={
        "var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}",
        "windows": fresh_topics.windows.model_copy(update={"conversion_window_s": 3600.0,
                                                           "idle_advance_rate": CLOSE_WHEN_IDLE})})
    topic_of = {"impressions": conf.topics.impressions, "clicks": conf.topics.clicks,
                "conversions": conf.topics.conversions}
    plan: list[tuple[str, bytes | None, bytes, list, bool]] = []  # topic, key, value, headers, not an object
    good: list[int] = []

    def send(topic: str, key: bytes | None, value: bytes, headers, not_an_object: bool = False) -> None:
        plan.append((topic, key, value, list(headers), not_an_object))

    def send_good(n: int) -> None:
        imp = Impression(impression_id=f"good-{n}", request_id=f"g{n}", user_id=900_000 + n, ad_id=7, advertiser_id=3,
                         campaign_id=4, placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=NOW,
                         model_version="m", served_pctr=0.1, served_pcvr=0.1, feature_ref=f"good-{n}")
        clk = Click(click_id=f"gc-{n}", impression_id=f"good-{n}", user_id=900_000 + n, ad_id=7,
                    event_time_ms=NOW + 2_000)
        send(conf.topics.impressions, *encode(imp))
        send(conf.topics.clicks, *encode(clk))
        good.append(n)

    @settings(max_examples=ROUNDS, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(fuzzed_record(), min_size=PER_ROUND, max_size=PER_ROUND))
    def one_round(batch: list[dict]) -> None:
        send_good(len(good))
        for r in batch:
            send(topic_of[r["topic"]], r["key"], r["value"], r["headers"], r["not_an_object"])
        send_good(len(good))

    one_round()
    sent_bad = asyncio.run(_produce(conf, plan))  # aiokafka: kafka-python cannot send a header without a value
    assert len(good) == 2 * ROUNDS and len(sent_bad) > ROUNDS, len(sent_bad)

    joiner = start_worker(conf, f"fz-{uuid.uuid4().hex[:6]}", tmp_path / "joiner.log")
    realtime = start_worker(conf, f"fz-{uuid.uuid4().hex[:6]}", tmp_path / "realtime.log",
                            app_module="streams.realtime_app")
    want_joined = {f"good-{n}" for n in good}
    want_users = {f"user:{900_000 + n}" for n in good}
    want_dead = {("label_joiner", *b) for b in sent_bad}
    want_dead |= {("realtime_fanout", *b) for b in sent_bad if b[0] != conf.topics.conversions}
    try:
        deadline = time.monotonic() + 240
        while True:
            for name, proc in (("joiner", joiner), ("realtime", realtime)):
                assert proc.poll() is None, f"the {name} worker exited: " + \
                    (tmp_path / f"{name}.log").read_text()[-3000:]
            labels = [decode(MaturedLabel, r.value, r.headers) for r in read_topic(conf, conf.topics.matured_labels)]
            matured = {m.impression_id: m for m in labels}
            users = {r.key.decode() for r in read_topic(conf, conf.topics.realtime_features)}
            letters = [decode(DeadLetter, r.value, r.headers) for r in read_topic(conf, conf.topics.dead_letters)]
            dead = {(d.stage, d.source_topic, d.partition, d.offset) for d in letters}
            done = want_joined <= set(matured) and want_users <= users and want_dead <= dead
            if done or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        stop_worker(joiner)
        stop_worker(realtime)
    assert want_joined <= set(matured), sorted(want_joined - set(matured))
    assert all(matured[i].clicked for i in want_joined)
    assert want_users <= users, sorted(want_users - users)
    assert want_dead <= dead, sorted(want_dead - dead)[:10]
