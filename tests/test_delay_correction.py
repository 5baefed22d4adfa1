"""On the freshest simulated day naive labels underestimate the CVR; both correction schemes do not."""

from __future__ import annotations

from infra.settings import get_settings
from label_joiner.delay_report import DELAY_CURVE, FNW, NAIVE, configs, report


def test_each_scheme_corrects_the_freshest_day():
    # The report's defaults: eight days of steady traffic (FNW needs a whole window of history), then the
    # evaluated day with ~19k clicks and ~3.5k in-window conversions, about half of them not arrived yet.
    recent, history = configs(history_days=8, impressions_per_hour=4_000, ctr=0.2, cvr=0.2, drift=0.0)
    table = report(recent, history, get_settings())
    err = table["relative error"]
    assert table["clicks"].iloc[0] > 15_000 and table["conversions_in_window"].iloc[0] > 3_000
    assert err[NAIVE] < -0.25, table  # many conversions of the last day have not arrived
    assert abs(err[FNW]) < 0.05, table
    assert abs(err[DELAY_CURVE]) < 0.05, table
