"""On the freshest simulated day, naive labels underestimate the CVR; the delay-curve estimate does not."""

from __future__ import annotations

from infra.settings import get_settings
from label_joiner.delay_report import report
from streams.simulator.config import SimulatorConfig


def test_delay_curve_corrects_the_freshest_day():
    # The report's defaults: two days of traffic, the CVR of the last day (~14k clicks) against the truth.
    recent = SimulatorConfig(hours=48, impressions_per_hour=20_000, cvr=0.05, speed=0, prediction_log=False,
                             seed=31)
    history = recent.model_copy(update={"seed": 32, "hours": 24, "drift_logit_per_day": 0.0})
    table = report(recent, history, get_settings())
    err = table["relative error"]
    assert table["clicks"].iloc[0] > 10_000
    assert err["naive (observed / clicks)"] < -0.25  # many conversions of the last day have not arrived
    assert abs(err["delay_curve (observed / sum F(elapsed))"]) < 0.05
    # FNW fixes the bias of duplicated positives, not of conversions that have not arrived yet.
    assert abs(err["fnw (FNW fixed point on the emitted stream)"] - err["naive (observed / clicks)"]) < 1e-9
