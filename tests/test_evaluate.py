"""`make evaluate` at its CI scale, judged on what the README claims: online updates recover from a drift that
frozen and daily warm-started models do not, delay correction closes most of the naive-to-oracle CVR gap,
calibrated batch models are calibrated, and the report is written."""

from __future__ import annotations

import json

import numpy as np

from infra.settings import get_settings
from trainers.evaluate import run


def test_evaluation_against_the_simulators_truth(tmp_path):
    result = run(get_settings(), "ci", out_dir=tmp_path)
    rows = result["models"]["rows"]
    for name in ("(a) oracle", "(b) full retrain", "(c) warm start", "(f) river baseline", "(d) online after drift",
                 "(e) frozen after drift"):
        assert set(rows[name]) == {"ctr", "cvr", "ctcvr"}, name
    # The oracle is the ceiling; the batch models learn something and are calibrated after the undoing.
    assert rows["(a) oracle"]["ctr"]["auc"] > rows["(b) full retrain"]["ctr"]["auc"] > 0.65
    assert rows["(b) full retrain"]["ctr"]["ece"] < 0.015, rows["(b) full retrain"]["ctr"]
    assert abs(rows["(b) full retrain"]["ctr"]["mean_p"] / rows["(b) full retrain"]["ctr"]["rate"] - 1) < 0.15

    # After the drift (hour 24 on), the online ranker's CTR log loss is below the daily warm start's and the
    # frozen model's, hour by hour on average.
    curve = result["models"]["curve"]
    after = {k: np.mean([c[k] for c in curve if c["hour"] >= 24]) for k in ("online", "frozen", "daily warm start")}
    assert after["online"] < 0.97 * after["daily warm start"], after
    assert after["daily warm start"] <= 1.01 * after["frozen"], after
    assert rows["(d) online after drift"]["ctr"]["nll"] < rows["(e) frozen after drift"]["ctr"]["nll"]

    # Delay correction: naive labels underestimate CVR; FNW and the delay curve close much of the gap.
    delay = result["delay"]
    assert delay["naive"]["mean_pcvr"] < delay["oracle labels"]["mean_pcvr"]
    assert delay["fnw"]["gap closed"] > 0.3, delay
    assert delay["delay_curve"]["gap closed"] > 0.5, delay

    html = (tmp_path / "report.html").read_text()
    assert html.count("<img") >= 2 and "Delay correction" in html
    assert json.loads((tmp_path / "summary.json").read_text())["scale"]["name"] == "ci"
