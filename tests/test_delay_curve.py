"""The delay curve: overall and per segment, its artifact, and the soft label the joiner derives from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from infra.settings import get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.schemes import make_scheme

HOUR_MS = 3_600_000
WINDOW_S = 7 * 86_400.0


def matured(advertiser: int, clicks: int, cvr: float, mean_delay_h: float, rng) -> pd.DataFrame:
    converted = rng.random(clicks) < cvr
    click_t = rng.integers(0, 24 * HOUR_MS, clicks)
    delay = np.minimum(rng.exponential(mean_delay_h * HOUR_MS, clicks), WINDOW_S * 1000 - 1).astype(np.int64)
    return pd.DataFrame({"clicked": True, "converted": converted, "click_time_ms": click_t,
                         "conversion_time_ms": np.where(converted, click_t + delay, -1),
                         "advertiser_id": advertiser, "campaign_id": advertiser * 10})


@pytest.fixture
def labels() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    # Advertiser 1 converts fast, 2 slowly, 3 too rarely for a curve of its own.
    return pd.concat([matured(1, 20_000, 0.10, 1.0, rng), matured(2, 20_000, 0.05, 48.0, rng),
                      matured(3, 500, 0.10, 1.0, rng)], ignore_index=True)


def test_overall_curve_is_the_empirical_cdf(labels):
    curve = DelayCurve.fit(labels, WINDOW_S)
    conv = labels[labels["converted"]]
    delays_s = (conv["conversion_time_ms"] - conv["click_time_ms"]) / 1000.0
    for e in (600.0, 3600.0, 86_400.0):
        assert curve.cdf(e) == pytest.approx((delays_s <= e).mean(), abs=0.02)
    assert curve.cdf(WINDOW_S) == 1.0 and curve.cdf(0.0) < 0.01
    assert curve.cvr == pytest.approx(len(conv) / len(labels))
    assert curve.segments == {}


def test_segments_get_their_own_curve_and_small_ones_fall_back(labels):
    curve = DelayCurve.fit(labels, WINDOW_S, segment_field="advertiser_id", min_conversions=200)
    assert set(curve.segments) == {"1", "2"}
    # Exponential delays: F(1 h) = 1 - exp(-1) for the fast advertiser, 1 - exp(-1/48) for the slow one.
    assert curve.cdf(3600, 1) == pytest.approx(1 - np.exp(-1), abs=0.03)
    assert curve.cdf(3600, 2) == pytest.approx(1 - np.exp(-1 / 48), abs=0.03)
    assert curve.cdf(3600, 3) == curve.cdf(3600) == curve.cdf(3600, None)
    assert curve.segment_cvr(2) == pytest.approx(0.05, abs=0.01)
    # The soft label of a click still unconverted after an hour: the slow advertiser keeps most of its
    # prior, the fast one little of it.
    assert curve.eventual_conversion(3600, segment=2) > 0.8 * curve.segment_cvr(2)
    assert curve.eventual_conversion(3600, segment=1) < 0.5 * curve.segment_cvr(1)


def test_segment_field_is_checked(labels):
    with pytest.raises(ValueError, match="segment field"):
        DelayCurve.fit(labels, WINDOW_S, segment_field="user_id")


def test_published_artifact_round_trips_and_drives_the_scheme(labels, tmp_path):
    settings = get_settings().model_copy(update={"var_dir": tmp_path})
    assert DelayCurve.load_latest(settings) is None
    curve = DelayCurve.fit(labels, WINDOW_S, segment_field="advertiser_id")
    path = curve.publish(settings)
    assert path.with_suffix(".png").stat().st_size > 0
    loaded = DelayCurve.load_latest(settings)
    assert loaded.version and loaded.segments.keys() == curve.segments.keys()
    assert loaded.cdf(7200, 2) == curve.cdf(7200, 2)

    scheme = make_scheme("delay_curve", loaded, [3600.0])
    base = {"impression_id": "i", "user_id": 1, "ad_id": 1, "advertiser_id": 2, "campaign_id": 20,
            "placement": "feed", "position": 0, "device": "mobile", "model_version": "m",
            "impression_time_ms": 0, "click_time_ms": 1000, "conversion_time_ms": None}
    entry, examples = {"sent": {}}, []
    scheme.on_change(entry, base, {"id": "c", "t": 1000}, None, 1000 + 3_600_000 + 1, examples)  # the clock past it
    (ex,) = examples
    assert ex["delay_cdf"] == pytest.approx(loaded.cdf(3600, 2))
    assert ex["label_ctcvr"] == pytest.approx(loaded.eventual_conversion(3600, segment=2))


def censored_clicks(n: int, days: float, as_of_day: float, rng, cvr: float = 0.1) -> tuple[pd.DataFrame, dict]:
    """Clicks spread over ``days``, observed at the end of ``as_of_day``: delays 50 % Exp(1 h) + 50 %
    LogNormal(median 3 days, sigma 1), a conversion only inside the window. Also returns the truth."""
    day = 86_400_000
    click_t = rng.integers(0, int(days * day), n)
    fast = rng.random(n) < 0.5
    delay_s = np.where(fast, rng.exponential(3600.0, n), rng.lognormal(np.log(3 * 86_400.0), 1.0, n))
    converts = (rng.random(n) < cvr) & (delay_s <= WINDOW_S)
    conv_t = click_t + (delay_s * 1000).astype(np.int64)
    as_of = int(as_of_day * day)
    seen = converts & (conv_t <= as_of)
    frame = pd.DataFrame({"clicked": True, "converted": seen, "click_time_ms": click_t,
                          "conversion_time_ms": np.where(seen, conv_t, -1), "as_of_ms": as_of})
    return frame, {"delay_s": delay_s, "converts": converts, "seen_delay_s": ((conv_t - click_t) / 1000.0)[seen]}


E_CHECKS = (3600.0, 6 * 3600.0, 86_400.0, 2 * 86_400.0)


def test_censored_fit_recovers_the_curve_before_a_window_has_passed():
    """Three days of clicks observed at the end of day 3 (most still open, window 7 days): Kaplan-Meier with
    the open clicks censored recovers the curve; the empirical CDF of the conversions seen so far is far off.

    Measured (seed 11; |KM - truth| stayed under 0.02 on seeds 1-3 too): KM - F_3d = +0.003, +0.009,
    +0.013, +0.012 at 1 h, 6 h, 1 d, 2 d; naive - F_3d = +0.091, +0.141, +0.139, +0.085. F_3d is F relative
    to the conversions that arrive within the 3 days followed: beyond the follow-up nothing is observed and
    the curve holds 1 - S flat, so against the true in-window F (17 % of in-window conversions come after
    day 3) the fit is high by +0.07 to +0.16 (naive: +0.16 to +0.27), and the CVR is a lower bound."""
    frame, truth = censored_clicks(200_000, 3, 3, np.random.default_rng(11))
    curve = DelayCurve.fit(frame, WINDOW_S)
    true_delays = truth["delay_s"][truth["converts"]]
    followed = 3 * 86_400.0
    for e in E_CHECKS:
        true_f = (true_delays <= e).mean()
        true_f_followed = true_f / (true_delays <= followed).mean()
        assert curve.cdf(e) == pytest.approx(true_f_followed, abs=0.03)
        assert abs((truth["seen_delay_s"] <= e).mean() - true_f_followed) > 0.06
        # 1 - S(e), the share of clicks converted by e, needs no extrapolation: KM gets it unscaled.
        true_by_e = (truth["converts"] & (truth["delay_s"] <= e)).mean()
        assert curve.cvr * curve.cdf(e) == pytest.approx(true_by_e, rel=0.05)
        assert curve.cdf(e) >= true_f  # F is overstated (relative to the follow-up), as documented
    assert curve.max_follow_up_s == pytest.approx(followed, rel=0.01)
    # The CVR is a lower bound: the conversions by day 3, not the in-window ones.
    assert curve.cvr == pytest.approx((truth["converts"] & (truth["delay_s"] <= followed)).mean(), rel=0.03)
    assert curve.cvr < truth["converts"].mean()


def test_matured_and_open_clicks_fit_together_over_the_whole_window():
    """Matured labels (no as_of_ms: NaN after the concat) plus open clicks in one frame, as
    read_observations returns them: matured rows are followed for the window, so the whole F is recovered."""
    frame, truth = censored_clicks(200_000, 10, 10, np.random.default_rng(3))
    matured_rows = frame["click_time_ms"] <= 3 * 86_400_000  # their window closed by day 10
    frame.loc[matured_rows, "as_of_ms"] = np.nan
    curve = DelayCurve.fit(frame, WINDOW_S)
    assert curve.max_follow_up_s == WINDOW_S
    true_delays = truth["delay_s"][truth["converts"]]
    for e in E_CHECKS + (5 * 86_400.0,):
        assert curve.cdf(e) == pytest.approx((true_delays <= e).mean(), abs=0.02)
    assert curve.cvr == pytest.approx(truth["converts"].mean(), rel=0.03)


def test_censored_segments_get_their_own_curve():
    """Per-segment Kaplan-Meier on the same grid, with open clicks: a fast and a slow advertiser."""
    rng = np.random.default_rng(7)
    frames = []
    for advertiser, mean_delay_h in ((1, 1.0), (2, 24.0)):
        frame = matured(advertiser, 30_000, 0.1, mean_delay_h, rng)
        frame["click_time_ms"] = rng.integers(0, 2 * 24 * HOUR_MS, len(frame))  # two days of clicks
        conv_t = frame["click_time_ms"] + rng.exponential(mean_delay_h * HOUR_MS, len(frame)).astype(np.int64)
        frame["as_of_ms"] = 2 * 24 * HOUR_MS
        frame["converted"] &= conv_t <= frame["as_of_ms"]
        frame["conversion_time_ms"] = np.where(frame["converted"], conv_t, -1)
        frames.append(frame)
    labels = pd.concat(frames, ignore_index=True)
    curve = DelayCurve.fit(labels, WINDOW_S, segment_field="advertiser_id", min_conversions=200)
    assert set(curve.segments) == {"1", "2"} and curve.segment_field == "advertiser_id"
    assert all(len(seg["cdf_values"]) == len(curve.grid_s) for seg in curve.segments.values())
    # Followed for 2 days: F relative to the conversions by then (exponential delays).
    for advertiser, mean_delay_h in ((1, 1.0), (2, 24.0)):
        by_follow_up = 1 - np.exp(-48 / mean_delay_h)
        assert curve.cdf(6 * 3600, advertiser) == pytest.approx((1 - np.exp(-6 / mean_delay_h)) / by_follow_up,
                                                                abs=0.03)
        assert curve.segment_cvr(advertiser) == pytest.approx(0.1 * by_follow_up, rel=0.05)
    assert curve.cdf(3600, 1) > curve.cdf(3600) > curve.cdf(3600, 2)


@pytest.mark.parametrize("frame, counts", [
    (pd.DataFrame(columns=["impression_id", "clicked", "converted", "click_time_ms", "conversion_time_ms"]),
     "0 clicks, 0 conversions"),
    (pd.DataFrame({"clicked": [True, True, False], "converted": False, "click_time_ms": [0, 1, None],
                   "conversion_time_ms": None, "as_of_ms": 10}), "2 clicks, 0 conversions"),
])
def test_nothing_to_fit_says_so_in_one_line(frame, counts, capsys, tmp_path, monkeypatch):
    from label_joiner import delay_curve

    monkeypatch.setattr(delay_curve, "get_settings", lambda: get_settings().model_copy(update={"var_dir": tmp_path}))
    monkeypatch.setattr(delay_curve, "read_observations", lambda settings: frame)
    assert delay_curve.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("delay curve: nothing to fit") and counts in err[0]
    assert not (tmp_path / "artifacts").exists()


def test_nothing_to_fit_is_one_line(fresh_topics, capsys, tmp_path, monkeypatch):
    """Fresh, empty topics (as right after a demo starts)."""
    from label_joiner import delay_curve

    monkeypatch.setattr(delay_curve, "get_settings", lambda: fresh_topics.model_copy(update={"var_dir": tmp_path}))
    assert delay_curve.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("delay curve: nothing to fit")


def test_observations_are_matured_labels_plus_open_clicks(fresh_topics):
    """read_observations: a matured label wins over the examples of its impression; an open click is
    converted when any of its examples is; as_of_ms is the newest event time in the two topics."""
    from kafka import KafkaProducer

    from label_joiner.delay_curve import read_observations
    from schemas.codec import encode
    from schemas.events import MaturedLabel, TrainingExample

    ids = {"user_id": 1, "ad_id": 1, "advertiser_id": 4, "campaign_id": 40}
    labels = [MaturedLabel(impression_id="m1", impression_time_ms=0, clicked=True, converted=True, click_time_ms=10,
                           conversion_time_ms=3_600_010, **ids),
              MaturedLabel(impression_id="m2", impression_time_ms=5, clicked=False, converted=False, **ids),
              MaturedLabel(impression_id="m3", impression_time_ms=6, clicked=True, converted=False, click_time_ms=7,
                           **ids)]

    def ex(imp: str, kind: str, clicked: bool, converted: bool, as_of: int, click_t: int | None = None,
           conv_t: int | None = None) -> TrainingExample:
        return TrainingExample(example_id=f"{imp}/{kind}", impression_id=imp, placement="feed", position=0,
                               device="mobile", model_version="m", impression_time_ms=max(0, (click_t or 0) - 5),
                               clicked=clicked, converted=converted, scheme="naive", label_ctr=float(clicked),
                               label_ctcvr=float(converted), weight=1.0, as_of_ms=as_of, click_time_ms=click_t,
                               conversion_time_ms=conv_t, **ids)

    examples = [ex("m1", "click", True, False, 10, 10),  # superseded by its matured label
                ex("o1", "click", True, False, 1_000, 1_000), ex("o1", "conv", True, True, 5_000, 1_000, 5_000),
                ex("o2", "click", True, False, 2_000, 2_000),
                ex("o3", "noclick", False, False, 90_000)]
    producer = KafkaProducer(**fresh_topics.kafka.client_config(), acks="all")
    for topic, events in ((fresh_topics.topics.matured_labels, labels),
                          (fresh_topics.topics.training_examples, examples)):
        for event in events:
            key, value, headers = encode(event)
            producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()

    got = read_observations(fresh_topics).set_index("impression_id")
    assert sorted(got.index) == ["m1", "m2", "m3", "o1", "o2"]
    assert got.loc["m1", "converted"] and got.loc["m1", "conversion_time_ms"] == 3_600_010
    assert got.loc[["m1", "m2", "m3"], "as_of_ms"].isna().all()  # matured: followed for the window
    assert got.loc["o1", "converted"] and got.loc["o1", "conversion_time_ms"] == 5_000
    assert not got.loc["o2", "converted"]
    assert got.loc["o1", "as_of_ms"] == got.loc["o2", "as_of_ms"] == 3_600_010  # the matured conversion
    curve = DelayCurve.fit(got.reset_index(), WINDOW_S)
    assert curve.n_clicks == 4 and curve.n_conversions == 2 and curve.max_follow_up_s == WINDOW_S
