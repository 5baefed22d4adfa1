"""How far each label scheme's conversion-rate estimate is from the truth on the freshest day.

``python -m label_joiner.delay_report`` simulates a history (to fit the delay curve on matured data) and
a recent run, replays the recent run through the joiner, and compares, for the clicks of the last
simulated day, the post-click CVR each scheme implies with the simulator's ground truth (conversion
within the window, whether or not it has arrived yet):

* naive: observed conversions / clicks;
* fnw: the constant p an FNW-weighted logistic loss converges to on the emitted stream (negatives
  weighted (1 - p)(1 + p), duplicate positives (1 + p)): the root of p = P / (P + N (1 - p));
* delay_curve: observed conversions / sum over clicks of F(elapsed), F the historical delay curve.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from infra.settings import Settings, get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.join import LabelJoiner
from label_joiner.replay import replay
from label_joiner.schemes import make_scheme
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate

DAY_MS = 86_400_000


def historical_curve(cfg: SimulatorConfig, settings: Settings) -> DelayCurve:
    """Fit on a separate, older run whose windows have all closed (its truth is its matured labels)."""
    truth = generate(cfg, settings).truth
    matured = pd.DataFrame({"clicked": truth["clicked"], "converted": truth["converted_in_window"],
                            "click_time_ms": truth["click_time_ms"], "conversion_time_ms": truth["conversion_time_ms"]})
    return DelayCurve.fit(matured, settings.windows.conversion_window_s)


def fnw_fixed_point(positives: int, negatives: int) -> float:
    p = positives / max(positives + negatives, 1)
    for _ in range(200):
        p = positives / (positives + negatives * (1 - p))
    return p


def report(recent: SimulatorConfig, history: SimulatorConfig, settings: Settings) -> pd.DataFrame:
    curve = historical_curve(history, settings)
    gen = generate(recent, settings)
    joiner = LabelJoiner(settings.windows, make_scheme("naive"), state={})
    examples = replay(joiner, gen.schedule, flush=False).examples_frame()
    end_ms = recent.end_ms
    clicks = examples[examples["clicked"] & ~examples["converted"]]
    clicks = clicks[clicks["click_time_ms"] >= end_ms - DAY_MS].drop_duplicates("impression_id")
    converted_ids = set(examples.loc[examples["converted"], "impression_id"])
    observed = clicks["impression_id"].isin(converted_ids)
    truth = gen.truth.set_index("impression_id").loc[clicks["impression_id"], "converted_in_window"]
    elapsed_s = (end_ms - clicks["click_time_ms"]) / 1000.0
    f = elapsed_s.map(curve.cdf)
    true_cvr = float(truth.mean())
    rows = {
        "truth (in-window conversions, arrived or not)": true_cvr,
        "naive (observed / clicks)": float(observed.mean()),
        "fnw (FNW fixed point on the emitted stream)": fnw_fixed_point(int(observed.sum()), len(clicks)),
        "delay_curve (observed / sum F(elapsed))": float(observed.sum() / f.sum()),
    }
    return pd.DataFrame({"cvr": rows, "relative error": {k: v / true_cvr - 1 for k, v in rows.items()}}).assign(
        clicks=len(clicks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m label_joiner.delay_report", description=__doc__)
    p.add_argument("--hours", type=float, default=48)
    p.add_argument("--impressions-per-hour", type=float, default=20_000)
    p.add_argument("--cvr", type=float, default=0.05)
    a = p.parse_args(argv)
    recent = SimulatorConfig(hours=a.hours, impressions_per_hour=a.impressions_per_hour, cvr=a.cvr, speed=0,
                             prediction_log=False, seed=31)
    history = recent.model_copy(update={"seed": 32, "hours": 24, "drift_logit_per_day": 0.0})
    table = report(recent, history, get_settings())
    with pd.option_context("display.width", 140, "display.float_format", "{:.4f}".format):
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
