"""Each label scheme judged on what the joiner actually emits, against the simulator's truth, on the freshest day.

``python -m label_joiner.delay_report`` (``make delay-report``) fits the delay curve on an older run,
simulates a recent run of ``--history-days`` plus one day, replays it through one join per scheme (one pass,
in-process, the worker's own code), and looks at the last simulated day's clicks as a trainer reading the
training-example stream at the end of the run would see them:

* naive and delay_curve: the newest example per impression (corrections supersede earlier ones); its
  ``label_ctcvr`` is the click's conversion label. A click still inside delay_curve's elapsed window has no
  example yet and is left out of that scheme's rows (``clicks labelled``).
* fnw: every click is a negative and every conversion an extra positive; FNW's weighted loss settles at the
  constant p = positives / negatives over the day's emitted examples, its CVR estimate.

Against the truth (the day's clicks that convert within the window, arrived or not): the CVR each scheme
implies, its relative error, and the Brier score of the per-click labels (lower is better). Writes an
HTML report with the table and, per click age, each scheme's mean label beside the truth.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from infra.settings import Settings, get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.replay import new_join, replay_each
from label_joiner.rules import Rules
from label_joiner.schemes import make_scheme
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate

DAY_MS = 86_400_000
TRUTH = "truth (in-window conversions, arrived or not)"
NAIVE = "naive (newest emitted label)"
FNW = "fnw (FNW fixed point on the day's emitted stream)"
DELAY_CURVE = "delay_curve (newest emitted label)"


def historical_curve(cfg: SimulatorConfig, settings: Settings) -> DelayCurve:
    """Fit on a separate, older run whose windows have all closed (its truth is its matured labels)."""
    truth = generate(cfg, settings).truth
    matured = pd.DataFrame({"clicked": truth["clicked"], "converted": truth["converted_in_window"],
                            "click_time_ms": truth["click_time_ms"], "conversion_time_ms": truth["conversion_time_ms"]})
    return DelayCurve.fit(matured, settings.windows.conversion_window_s)


def emitted(gen, schemes: list[str], curve: DelayCurve, settings: Settings) -> dict[str, pd.DataFrame]:
    """Per scheme, every training example the joiner emits over the generated run ``gen`` (its end is "now");
    one replay feeds every scheme's join."""
    joins = [new_join(Rules.from_settings(settings.windows),
                      make_scheme(scheme, curve, settings.windows.elapsed_windows_s)) for scheme in schemes]
    results = replay_each(joins, gen.schedule, flush=False, advance_every=200)
    return {scheme: result.examples_frame() for scheme, result in zip(schemes, results, strict=True)}


def report(recent: SimulatorConfig, history: SimulatorConfig, settings: Settings) -> tuple[pd.DataFrame, dict]:
    """One row per estimate for the last day of ``recent``; and per scheme, the day's per-click labels."""
    curve = historical_curve(history, settings)
    gen = generate(recent, settings)
    truth = gen.truth.set_index("impression_id")["converted_in_window"]
    day_start = recent.end_ms - DAY_MS
    rows, labels = {}, {}
    clicks = None
    for scheme, ex in emitted(gen, ["naive", "fnw", "delay_curve"], curve, settings).items():
        day = ex[ex["clicked"] & (ex["click_time_ms"] >= day_start)]
        if scheme == "naive":
            clicks = day.drop_duplicates("impression_id")[["impression_id", "click_time_ms"]]
        if scheme == "fnw":
            negatives = int((~ex["converted"] & ex["clicked"] & (ex["click_time_ms"] >= day_start)).sum())
            positives = int((ex["converted"] & (ex["conversion_time_ms"] >= day_start)).sum())
            rows[FNW] = (positives / max(negatives, 1), np.nan, negatives)
            continue
        newest = day.drop_duplicates("impression_id", keep="last").set_index("impression_id")["label_ctcvr"]
        y = truth.loc[newest.index].astype(float)
        name = NAIVE if scheme == "naive" else DELAY_CURVE
        rows[name] = (float(newest.mean()), float(((newest - y) ** 2).mean()), len(newest))
        labels[name] = newest
    true_cvr = float(truth.loc[clicks["impression_id"]].mean())
    rows = {TRUTH: (true_cvr, 0.0, len(clicks)), **rows}
    table = pd.DataFrame({"cvr": {k: v[0] for k, v in rows.items()},
                          "relative error": {k: v[0] / true_cvr - 1 for k, v in rows.items()},
                          "brier": {k: v[1] for k, v in rows.items()},
                          "clicks labelled": {k: v[2] for k, v in rows.items()}})
    table = table.assign(clicks=len(clicks), conversions_in_window=int(truth.loc[clicks["impression_id"]].sum()))
    ages = ((recent.end_ms - clicks.set_index("impression_id")["click_time_ms"]) / 3_600_000).rename("age_h")
    return table, {"labels": labels, "truth": truth, "ages": ages}


def html(table: pd.DataFrame, detail: dict, path: Path) -> Path:
    """The table and a plot of the mean label per click age, beside the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ages = detail["ages"]
    bins = np.arange(0, 25, 1.0)
    fig, ax = plt.subplots(figsize=(8, 4))
    age_bin = pd.cut(ages, bins)
    truth = detail["truth"].loc[ages.index].astype(float).groupby(age_bin, observed=False).mean()
    ax.plot(bins[:-1] + 0.5, truth.to_numpy(), color="black", linewidth=2, label="truth")
    for name, lab in detail["labels"].items():
        means = lab.groupby(pd.cut(ages.loc[lab.index], bins), observed=False).mean()
        ax.plot(bins[:-1] + 0.5, means.to_numpy(), label=name)
    ax.set_xlabel("hours since the click (at the end of the run)")
    ax.set_ylabel("mean conversion label")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<html><head><title>Delay correction report</title></head><body>"
                    f"<h1>Delay correction on the freshest simulated day</h1>{table.to_html(float_format='%.4f')}"
                    f"<h2>Mean label by click age</h2><img src='data:image/png;base64,{img}'/></body></html>")
    return path


def configs(history_days: float, impressions_per_hour: float, ctr: float, cvr: float, drift: float,
            seed: int = 31) -> tuple[SimulatorConfig, SimulatorConfig]:
    """The recent run (history plus the evaluated day) and the older run the delay curve is fitted on.

    Clicks are what matter here, so the defaults buy them with a high CTR rather than many impressions."""
    recent = SimulatorConfig(hours=24 * (history_days + 1), impressions_per_hour=impressions_per_hour, ctr=ctr,
                             cvr=cvr, drift_logit_per_day=drift, speed=0, prediction_log=False, seed=seed,
                             start="2026-10-01T00:00:00Z")
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
    settings = get_settings()
    recent, history = configs(a.history_days, a.impressions_per_hour, a.ctr, a.cvr, a.drift)
    table, detail = report(recent, history, settings)
    with pd.option_context("display.width", 200, "display.max_columns", 10, "display.float_format", "{:.4f}".format):
        print(table)
    path = html(table, detail, settings.var_dir / "reports" / "delay_correction.html")
    print(f"delay report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
