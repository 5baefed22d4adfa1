"""How far each label scheme's conversion-rate estimate is from the truth on the freshest day.

``python -m label_joiner.delay_report`` simulates an older run (to fit the delay curve on matured data)
and a recent run of ``--history-days`` plus one day, replays the recent run through the joiner, and
compares the post-click CVR each scheme implies for the last simulated day with the simulator's ground
truth (the day's clicks that convert within the window, whether or not the conversion has arrived yet):

* naive: the day's clicks that have an observed conversion / the day's clicks;
* fnw: the constant p an FNW-weighted logistic loss converges to on the examples *emitted during the
  day*. Every click is emitted at once as a (fake) negative and every conversion, whenever it arrives,
  as an extra positive; with weights (1 + p) on positives and (1 - p)(1 + p) on negatives (p held fixed
  in the gradient) the loss is stationary at p = positives / negatives. The day's positives are the
  conversions that arrive that day, mostly of older clicks: FNW is unbiased only once the stream has run
  for a whole conversion window under a steady conversion rate (``--drift`` shows what drift does);
* delay_curve: the day's observed conversions / sum over its clicks of F(elapsed), F the historical curve.
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
TRUTH = "truth (in-window conversions, arrived or not)"
NAIVE = "naive (observed / clicks)"
FNW = "fnw (FNW fixed point on the day's emitted stream)"
DELAY_CURVE = "delay_curve (observed / sum F(elapsed))"


def historical_curve(cfg: SimulatorConfig, settings: Settings) -> DelayCurve:
    """Fit on a separate, older run whose windows have all closed (its truth is its matured labels)."""
    truth = generate(cfg, settings).truth
    matured = pd.DataFrame({"clicked": truth["clicked"], "converted": truth["converted_in_window"],
                            "click_time_ms": truth["click_time_ms"], "conversion_time_ms": truth["conversion_time_ms"]})
    return DelayCurve.fit(matured, settings.windows.conversion_window_s)


def report(recent: SimulatorConfig, history: SimulatorConfig, settings: Settings) -> pd.DataFrame:
    """One row per estimate: its CVR for the last day of ``recent`` and its error relative to the truth."""
    curve = historical_curve(history, settings)
    gen = generate(recent, settings)
    joiner = LabelJoiner(settings.windows, make_scheme("fnw"), state={})
    examples = replay(joiner, gen.schedule, flush=False).examples_frame()
    day_start = recent.end_ms - DAY_MS
    fake_negatives = examples[examples["clicked"] & ~examples["converted"]].drop_duplicates("impression_id")
    positives = examples[examples["converted"]].drop_duplicates("impression_id")
    clicks = fake_negatives[fake_negatives["click_time_ms"] >= day_start]
    observed = clicks["impression_id"].isin(set(positives["impression_id"]))
    truth = gen.truth.set_index("impression_id").loc[clicks["impression_id"], "converted_in_window"]
    elapsed_s = (recent.end_ms - clicks["click_time_ms"]) / 1000.0
    day_positives = int((positives["conversion_time_ms"] >= day_start).sum())
    true_cvr = float(truth.mean())
    rows = {
        TRUTH: true_cvr,
        NAIVE: float(observed.mean()),
        FNW: day_positives / max(len(clicks), 1),
        DELAY_CURVE: float(observed.sum() / elapsed_s.map(curve.cdf).sum()),
    }
    return pd.DataFrame({"cvr": rows, "relative error": {k: v / true_cvr - 1 for k, v in rows.items()}}).assign(
        clicks=len(clicks), conversions_in_window=int(truth.sum()))


def configs(history_days: float, impressions_per_hour: float, ctr: float, cvr: float, drift: float,
            seed: int = 31) -> tuple[SimulatorConfig, SimulatorConfig]:
    """The recent run (history plus the evaluated day) and the older run the delay curve is fitted on.

    Clicks are what matter here, so the defaults buy them with a high CTR rather than many impressions."""
    recent = SimulatorConfig(hours=24 * (history_days + 1), impressions_per_hour=impressions_per_hour, ctr=ctr,
                             cvr=cvr, drift_logit_per_day=drift, speed=0, prediction_log=False, seed=seed)
    history = recent.model_copy(update={"seed": seed + 1, "hours": 48, "drift_logit_per_day": 0.0})
    return recent, history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m label_joiner.delay_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--history-days", type=float, default=8, help="days before the evaluated one (>= the window)")
    p.add_argument("--impressions-per-hour", type=float, default=4_000)
    p.add_argument("--ctr", type=float, default=0.2)
    p.add_argument("--cvr", type=float, default=0.2)
    p.add_argument("--drift", type=float, default=0.0, help="CTR/CVR logit drift per simulated day")
    a = p.parse_args(argv)
    recent, history = configs(a.history_days, a.impressions_per_hour, a.ctr, a.cvr, a.drift)
    table = report(recent, history, get_settings())
    with pd.option_context("display.width", 200, "display.max_columns", 10, "display.float_format", "{:.4f}".format):
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
