"""The Spark batch twin and the streaming worker agree, impression by impression, on the same events:
late deliveries, repeated clicks and conversions delivered out of order included."""

from __future__ import annotations

import time
import uuid

import orjson
import pandas as pd

from batch_jobs import bronze
from batch_jobs.silver import run
from infra.spark_session import spark_session
from label_joiner.delay_curve import read_matured
from label_joiner.evaluate import expected_labels
from label_joiner.rules import Rules
from label_joiner.worker import start_worker, stop_worker
from schemas.codec import schema_headers
from schemas.events import Click, Conversion
from schemas.features import N_CATEGORIES
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate, send_catalog
from tests.conftest import CLOSE_WHEN_IDLE

CFG = SimulatorConfig(hours=2, users=10_000, ads=2_000, impressions_per_hour=6_000, cvr=0.2, speed=0,
                      prediction_log=False, seed=23, late_share=0.03)
COLUMNS = ["clicked", "converted", "click_time_ms", "conversion_time_ms", "conversion_value", "negative_feedback"]


def repeats(truth: pd.DataFrame, settings) -> list[tuple]:
    """Second clicks and conversions with other ids, earlier in event time but delivered later."""
    ok = ~truth["impression_malformed"] & ~truth["impression_late"] & ~truth["click_malformed"] & ~truth["click_late"]
    t = truth[ok & truth["clicked"]]
    out = []
    for row in t.head(40).itertuples():  # (their conversions now name a click that is not attributed)
        click = Click(click_id=f"{row.impression_id}-c2", impression_id=row.impression_id, user_id=row.user_id,
                      ad_id=row.ad_id, event_time_ms=int(row.click_time_ms) - 1)
        out.append((settings.topics.clicks, click, int(row.click_delivery_ms) + 5_000))
    conv = truth[ok & truth["converted_in_window"] & ~truth["conversion_malformed"]
                 & ~truth["impression_id"].isin(t.head(40)["impression_id"])]
    for row in conv.head(30).itertuples():
        click_id = row.impression_id.replace("-i", "-c", 1)
        v = Conversion(conversion_id=f"{row.impression_id}-v0", click_id=click_id, impression_id=row.impression_id,
                       user_id=row.user_id, ad_id=row.ad_id, event_time_ms=int(row.conversion_time_ms) - 1_000,
                       value=1.0)
        out.append((settings.topics.conversions, v, int(row.conversion_delivery_ms) + 60_000))
    # Exact copies of timely clicks and conversions delivered again long after their lateness: the stream
    # counted the first copy, and so must the batch (a late copy must not hide it).
    lateness_ms = int(settings.windows.allowed_lateness_s * 1000) + 3_600_000
    for row in t.iloc[40:80].itertuples():
        click = Click(click_id=row.impression_id.replace("-i", "-c", 1), impression_id=row.impression_id,
                      user_id=row.user_id, ad_id=row.ad_id, event_time_ms=int(row.click_time_ms))
        out.append((settings.topics.clicks, click, int(row.click_delivery_ms) + lateness_ms))
    return out


def send_in_arrival_order(settings, gen, extra) -> None:
    from kafka import KafkaProducer

    msgs = [(topic, key, value, headers, when) for topic, key, value, headers, when in iter_messages(gen.schedule)]
    msgs += [(topic, e.key().encode(), orjson.dumps(e.model_dump()), schema_headers(type(e)), ts)
             for topic, e, ts in extra]
    msgs.sort(key=lambda m: m[4])
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=20)
    now = int(time.time() * 1000)
    for topic, key, value, headers, when in msgs:
        if when <= now:
            producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=when)
    producer.flush()
    producer.close()


def test_batch_equals_stream(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={
        "var_dir": tmp_path, "windows": fresh_topics.windows.model_copy(update={"conversion_window_s": 3600.0,
                                                                                "idle_advance_rate": CLOSE_WHEN_IDLE})})
    gen = generate(CFG, settings, drain=True)
    send_catalog(gen.campaigns, settings)
    extra = repeats(gen.truth, settings)
    send_in_arrival_order(settings, gen, extra)
    # The catalog changes after the day (every campaign moves to another category): a backfill of the day
    # must still label it with the catalog of its day.
    later = gen.campaigns.assign(category_id=(gen.campaigns["category_id"] + 1) % N_CATEGORIES,
                                 event_time_ms=int(time.time() * 1000))
    send_catalog(later, settings)
    want = expected_labels(gen.truth, Rules.from_settings(settings.windows))
    assert gen.truth["impression_late"].sum() > 0 and gen.truth["conversion_late"].sum() > 0

    worker = start_worker(settings, f"lj-{uuid.uuid4().hex[:6]}", tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 180
        while len(stream := read_matured(settings)) < len(want) and time.monotonic() < deadline:
            time.sleep(2)
        time.sleep(3)
        stream = read_matured(settings)
    finally:
        stop_worker(worker)
    assert len(stream) == len(want)

    ds = CFG.start.date()
    bronze.run(None, settings, quality=False)  # the twin reads the one raw landing
    path = run(ds, settings)
    batch = spark_session("test", settings).read.format("delta").load(path).toPandas()
    assert len(batch) == len(want)
    run(ds, settings, quality=False)  # re-running the day replaces it rather than appending
    assert spark_session("test", settings).read.format("delta").load(path).count() == len(want)

    s = stream.set_index("impression_id").sort_index()[COLUMNS]
    b = batch.set_index("impression_id").sort_index()[COLUMNS]
    pd.testing.assert_frame_equal(s, b, check_dtype=False)
    # Hides and reports: both count the same ones, the ones the rules keep (late and malformed ones are dropped).
    assert s["negative_feedback"].sum() > 10
    assert (s["negative_feedback"] == want.loc[s.index, "negative_feedback"]).all()
    truth = gen.truth.set_index("impression_id")  # silver carries the impression's context and category
    assert (batch.set_index("impression_id").loc[b.index, "category_id"] == truth.loc[b.index, "category_id"]).all()
    # The repeated, earlier clicks and conversions won in both (earliest event time, then id).
    won_clicks = {e.impression_id: e.event_time_ms for topic, e, _ in extra if isinstance(e, Click)}
    assert (s.loc[list(won_clicks), "click_time_ms"] == pd.Series(won_clicks)).all()
    won_convs = {e.impression_id: e.event_time_ms for topic, e, _ in extra if isinstance(e, Conversion)}
    assert (s.loc[list(won_convs), "conversion_time_ms"] == pd.Series(won_convs)).all()
