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
    scheme.on_change(entry, base, {"id": "c", "t": 1000}, None, 1000 + 3_600_000, examples)
    (ex,) = examples
    assert ex["delay_cdf"] == pytest.approx(loaded.cdf(3600, 2))
    assert ex["label_ctcvr"] == pytest.approx(loaded.eventual_conversion(3600, segment=2))


def test_censored_fit_recovers_the_curve_before_a_window_has_passed():
    """Three days of clicks observed at the end of day 3 (most still open): Kaplan-Meier with the open clicks
    censored recovers F; the empirical CDF of the conversions seen so far is far off."""
    rng = np.random.default_rng(11)
    n, cvr, day = 200_000, 0.1, 86_400_000
    click_t = rng.integers(0, 3 * day, n)
    fast = rng.random(n) < 0.5
    delay_s = np.where(fast, rng.exponential(3600.0, n), rng.lognormal(np.log(3 * 86_400.0), 1.0, n))
    converts = (rng.random(n) < cvr) & (delay_s <= WINDOW_S)
    conv_t = click_t + (delay_s * 1000).astype(np.int64)
    as_of = 3 * day
    seen = converts & (conv_t <= as_of)
    frame = pd.DataFrame({"clicked": True, "converted": seen, "click_time_ms": click_t,
                          "conversion_time_ms": np.where(seen, conv_t, -1), "as_of_ms": as_of})
    curve = DelayCurve.fit(frame, WINDOW_S)
    true_delays = delay_s[converts]
    observed_delays = ((conv_t - click_t) / 1000.0)[seen]
    for e in (3600.0, 6 * 3600.0, 86_400.0, 2 * 86_400.0):
        true_f = (true_delays <= e).mean()
        # Beyond 3 days nothing is observed: F is relative to the conversions seen within the follow-up.
        true_f_followed = true_f / (true_delays <= 3 * 86_400.0).mean()
        assert curve.cdf(e) == pytest.approx(true_f_followed, abs=0.03)
        assert abs((observed_delays <= e).mean() - true_f_followed) > 0.03 or e == 2 * 86_400.0
    assert curve.max_follow_up_s == pytest.approx(3 * 86_400.0, rel=0.01)


def test_nothing_to_fit_is_one_line(fresh_topics, capsys, tmp_path, monkeypatch):
    from label_joiner import delay_curve

    monkeypatch.setattr(delay_curve, "get_settings", lambda: fresh_topics.model_copy(update={"var_dir": tmp_path}))
    assert delay_curve.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("delay curve: nothing to fit")
