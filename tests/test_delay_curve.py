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

    scheme = make_scheme("delay_curve", loaded)
    base = {"impression_id": "i", "user_id": 1, "ad_id": 1, "advertiser_id": 2, "campaign_id": 20,
            "placement": "feed", "position": 0, "device": "mobile", "model_version": "m",
            "impression_time_ms": 0, "click_time_ms": 1000, "conversion_time_ms": None}
    (ex,) = scheme.on_click(base, now_ms=1000 + 3_600_000)
    assert ex.delay_cdf == pytest.approx(loaded.cdf(3600, 2))
    assert ex.label_ctcvr == pytest.approx(loaded.eventual_conversion(3600, segment=2))
