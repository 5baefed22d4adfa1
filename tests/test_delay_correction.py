"""Every scheme judged on the examples the joiner emits: on the freshest simulated day naive labels
underestimate the CVR; FNW's fixed point and the delay-curve labels do not, and the delay-curve labels are
closer to the truth click by click than the naive ones."""

from __future__ import annotations

from infra.settings import get_settings
from label_joiner.delay_report import DELAY_CURVE, FNW, NAIVE, configs, html, report


def test_each_scheme_on_what_the_joiner_emits(tmp_path):
    # Eight days of steady traffic (FNW needs a whole window of history), then the evaluated day with ~19k
    # clicks and ~3.5k in-window conversions, about half of them not arrived yet.
    recent, history = configs(history_days=8, impressions_per_hour=4_000, ctr=0.2, cvr=0.2, drift=0.0)
    table, detail = report(recent, history, get_settings())
    err = table["relative error"]
    assert table["clicks"].iloc[0] > 15_000 and table["conversions_in_window"].iloc[0] > 3_000
    assert err[NAIVE] < -0.25, table  # many conversions of the last day have not arrived
    assert abs(err[FNW]) < 0.05, table
    assert abs(err[DELAY_CURVE]) < 0.06, table
    assert table.loc[DELAY_CURVE, "brier"] < table.loc[NAIVE, "brier"], table
    # Only clicks still inside the first elapsed window (1 h) are unlabelled by delay_curve.
    assert table.loc[DELAY_CURVE, "clicks labelled"] > 0.9 * table["clicks"].iloc[0]
    assert html(table, detail, tmp_path / "report.html").read_text().count("<img") == 1
