"""The simulator's marginal rates match its configuration; the same seed gives the same events."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from infra.settings import get_settings
from schemas import Click, Conversion, Impression, InvalidEvent, PredictionLog, decode
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import KINDS, iter_messages
from streams.simulator.run import generate, send, write_truth
from tests.conftest import consume_all

CFG = SimulatorConfig(hours=24, users=50_000, ads=10_000, impressions_per_hour=40_000, cvr=0.05,
                      duplicate_share=0.02, late_share=0.01, malformed_share=0.01, speed=0)


@pytest.fixture(scope="module")
def day():
    return generate(CFG, get_settings(), drain=True)


def conv_delay_cdf(cfg: SimulatorConfig, seconds: float) -> float:
    fast = 1 - np.exp(-seconds / cfg.conv_fast_mean_s)
    slow = norm.cdf((np.log(seconds) - np.log(cfg.conv_slow_median_s)) / cfg.conv_slow_sigma)
    return cfg.conv_fast_share * fast + (1 - cfg.conv_fast_share) * slow


def test_volume_and_rates(day):
    t = day.truth
    assert len(t) == pytest.approx(CFG.hours * CFG.impressions_per_hour, rel=0.03)
    assert t["true_pctr"].mean() == pytest.approx(CFG.ctr, rel=0.01)
    assert t["clicked"].mean() == pytest.approx(CFG.ctr, rel=0.05)
    clicks = t[t["clicked"]]
    assert clicks["true_pcvr"].mean() == pytest.approx(CFG.cvr, rel=0.01)
    assert clicks["converts"].mean() == pytest.approx(CFG.cvr, rel=0.15)
    assert t["true_pctr"].quantile(0.99) > 3 * CFG.ctr  # probabilities vary per impression


def test_click_delays_inside_window(day):
    clicks = day.truth[day.truth["clicked"]]
    delay_s = (clicks["click_time_ms"] - clicks["event_time_ms"]) / 1000
    assert delay_s.max() < get_settings().windows.click_window_s
    assert delay_s.median() == pytest.approx(CFG.click_delay_median_s, rel=0.1)


def test_conversion_delay_quantiles_and_tail(day):
    delays = day.truth["conversion_delay_s"].dropna().to_numpy()
    assert len(delays) > 1000
    for seconds in (3600, 86_400, 7 * 86_400):
        assert (delays <= seconds).mean() == pytest.approx(conv_delay_cdf(CFG, seconds), abs=0.04)
    window = get_settings().windows.conversion_window_s
    assert 0.03 < (delays > window).mean() < 0.2  # a real tail beyond the window
    assert (delays > 86_400).mean() > 0.3  # a visible share after day 1


def test_delivery_defect_shares(day):
    t = day.truth
    for cls in (Impression, Click):
        happened = t if cls is Impression else t[t["clicked"]]
        assert happened[f"{cls.NAME}_duplicated"].mean() == pytest.approx(CFG.duplicate_share, rel=0.3)
        assert happened[f"{cls.NAME}_late"].mean() == pytest.approx(CFG.late_share, rel=0.35)
        assert happened[f"{cls.NAME}_malformed"].mean() == pytest.approx(CFG.malformed_share, rel=0.35)
    # Out-of-order: some clicks are delivered before their impression.
    c = t[t["clicked"]]
    assert (c["click_delivery_ms"] < c["impression_delivery_ms"]).sum() > 0


def test_drift_and_cold_start(day):
    t = day.truth
    first, last = t[t["event_time_ms"] < t["event_time_ms"].quantile(0.1)], t[
        t["event_time_ms"] > t["event_time_ms"].quantile(0.9)]
    assert last["true_pctr"].mean() < first["true_pctr"].mean()  # negative drift configured
    assert (t["ad_id"] >= CFG.ads).any()  # churned slots carry new ad ids


def test_payloads_validate_except_marked_malformed(day):
    messages = list(iter_messages(day.schedule))
    bad = 0
    for topic, _key, value, headers, _ in messages:
        cls = next(c for c in KINDS if day.schedule.topics[c] == topic)
        try:
            decode(cls, value, headers)
        except InvalidEvent:
            bad += 1
    assert bad == int((day.schedule.corruption >= 0).sum()) > 0


def test_same_seed_same_events():
    small = CFG.model_copy(update={"hours": 2.0})
    a = list(iter_messages(generate(small, get_settings()).schedule))
    b = list(iter_messages(generate(small, get_settings()).schedule))
    c = list(iter_messages(generate(small.model_copy(update={"seed": 8}), get_settings()).schedule))
    assert a == b
    assert a != c


def test_run_lands_in_kafka_with_ground_truth(fresh_topics, tmp_path):
    cfg = SimulatorConfig(hours=1, users=5_000, ads=1_000, impressions_per_hour=5_000, speed=0, run_id="t-run")
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    gen = generate(cfg, settings)
    counts = send(gen.schedule, settings, speed=0, start_ms=cfg.start_ms)
    assert sum(counts.values()) == len(gen.schedule)
    out = write_truth(gen, cfg, settings, counts)
    assert (out / "truth.parquet").exists() and (out / "summary.json").exists()
    t = settings.topics
    for cls, topic in ((Impression, t.impressions), (Click, t.clicks), (Conversion, t.conversions),
                       (PredictionLog, t.prediction_log)):
        records = consume_all(settings, topic, counts.get(topic, 0))
        assert len(records) == counts.get(topic, 0)
        ids = set()
        for r in records:
            try:
                ids.add(decode(cls, r.value, r.headers).impression_id)
            except InvalidEvent:
                pass
        truth_ids = set(gen.truth.loc[gen.truth[f"{cls.NAME}_delivered"]
                                      & ~gen.truth[f"{cls.NAME}_malformed"], "impression_id"])
        if cls is Impression:
            assert ids == truth_ids
        else:
            assert ids <= set(gen.truth["impression_id"])


def test_batched_path_lands_what_the_plain_producer_does(fresh_topics):
    """The load-test path (aiokafka record batches) lands what ``send`` (kafka-python) does with the same
    schedule: each record in the same partition, a partition's records in the same order, the timestamps kept."""
    from infra.topics import with_topic_prefix
    from streams.simulator.batched import send_batched

    cfg = SimulatorConfig(hours=1, users=5_000, ads=1_000, impressions_per_hour=5_000, speed=0, run_id="t-batch")
    plain = with_topic_prefix(fresh_topics, "plain")
    gen = generate(cfg, fresh_topics)
    counts = send_batched(gen.schedule, fresh_topics, speed=0, start_ms=cfg.start_ms)
    plain_counts = send(generate(cfg, plain).schedule, plain, speed=0, start_ms=cfg.start_ms)
    assert sum(counts.values()) == len(gen.schedule)
    t, tp = fresh_topics.topics, plain.topics
    for topic, plain_topic in ((t.impressions, tp.impressions), (t.clicks, tp.clicks),
                               (t.conversions, tp.conversions), (t.prediction_log, tp.prediction_log)):
        assert counts[topic] == plain_counts[plain_topic] > 0

        def by_partition(records):
            out: dict[int, list] = {}
            for r in sorted(records, key=lambda r: (r.partition, r.offset)):
                out.setdefault(r.partition, []).append((r.key, r.value, r.timestamp))
            return out

        got = by_partition(consume_all(fresh_topics, topic, counts[topic]))
        want = by_partition(consume_all(plain, plain_topic, counts[topic]))
        assert sum(map(len, got.values())) == counts[topic]  # nothing twice
        assert got == want
        if topic == t.impressions:
            assert len(got) == fresh_topics.kafka.default_partitions
