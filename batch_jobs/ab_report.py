"""The A/B report: ``python -m batch_jobs.ab_report [--control control] [--run RUN_ID | --truth PATH]``.

Per arm of the experiment (``PredictionLog.arm``; the serving settings hash users into arms): impressions, users,
CTR (clicks per impression), CVR (conversions per click) and revenue per 1000 impressions (RPM; CPA billing: the
price of every converted impression). Each arm's lift over the control arm comes with a 95 % confidence interval
by the delta method on per-user totals: users are the randomization unit, so impressions of one user are not
independent and the variance is the clustered one. With the simulator's truth (``truth.parquet``: the true
pCTR / pCVR of every impression) the report adds each arm's expected metrics from the true probabilities of the
impressions it showed, the true lift, and whether the interval covers it.

Labels: an impression counts once its click is known (a matured label or a training example: the joiner emits one
at the click or when the click window closes); its conversions are those seen so far (``--matured-only`` keeps
impressions whose label matured, so conversion windows are closed). Writes ``var/ab/report.html`` and
``var/ab/summary.json``.

>>> rng = np.random.default_rng(1)
>>> imps = pd.DataFrame({"arm": rng.choice(["control", "b"], 4000), "user_id": rng.integers(0, 400, 4000),
...                      "clicked": rng.random(4000) < 0.1, "converted": False, "price": 1.0})
>>> bool(lifts(user_totals(imps), "control").query("metric == 'ctr'")["significant"].iloc[0])
False
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from batch_jobs.monitor import (
    figure,
    json_ready,
    label_table,
    png,
    read_examples,
    read_matured,
    read_prediction_log,
    table_html,
)
from infra.settings import Settings, get_settings
from trainers.circuit_breaker import parse_time_ms

Z95 = 1.959964
# metric -> (numerator, denominator, scale) of per-user totals
METRICS = {"ctr": ("clicks", "impressions", 1.0), "cvr": ("conversions", "clicks", 1.0),
           "rpm": ("revenue", "impressions", 1000.0)}
NO_ARM = "(no arm)"


# -- pure logic ---------------------------------------------------------------------------------------------------


def user_totals(impressions: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, user): impressions, clicks, conversions, revenue (price of converted impressions)."""
    frame = impressions.assign(
        clicks=impressions["clicked"].astype(float),
        conversions=(impressions["clicked"].astype(bool) & impressions["converted"].astype(bool)).astype(float),
    )
    frame["revenue"] = frame["conversions"] * frame["price"].astype(float)
    return (frame.groupby(["arm", "user_id"], sort=True)
            .agg(impressions=("clicks", "size"), clicks=("clicks", "sum"), conversions=("conversions", "sum"),
                 revenue=("revenue", "sum"))
            .reset_index())


def ratio_with_variance(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """``R = sum(num) / sum(den)`` over clusters and its delta-method variance
    ``(s_a^2 - 2 R s_ab + R^2 s_b^2) / (n * mean(den)^2)`` (NaN when it cannot be estimated).

    >>> r, v = ratio_with_variance(np.array([1.0, 2, 3, 2]), np.array([10.0, 20, 30, 20]))
    >>> round(r, 3), round(v, 12)
    (0.1, 0.0)
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n = len(num)
    if n < 2 or den.sum() <= 0:
        return (num.sum() / den.sum() if den.sum() > 0 else math.nan), math.nan
    r = num.sum() / den.sum()
    cov = np.cov(num, den, ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * den.mean() ** 2)
    return float(r), float(max(var, 0.0))


def lift(treatment: pd.DataFrame, control: pd.DataFrame, metric: str, z: float = Z95) -> dict:
    """Relative lift ``R_t / R_c - 1`` of ``metric`` between two arms' per-user totals, its standard error
    (delta method, independent arms) and the ``z`` interval; significant when the interval excludes 0."""
    num, den, scale = METRICS[metric]
    rt, vt = ratio_with_variance(treatment[num].to_numpy(), treatment[den].to_numpy())
    rc, vc = ratio_with_variance(control[num].to_numpy(), control[den].to_numpy())
    out = {"metric": metric, "control_value": rc * scale, "value": rt * scale}
    if not (rc > 0 and rt > 0) or math.isnan(vt) or math.isnan(vc):
        return {**out, "lift": rt / rc - 1 if rc > 0 else math.nan, "se": math.nan, "ci_low": math.nan,
                "ci_high": math.nan, "significant": False}
    value = rt / rc - 1
    se = (rt / rc) * math.sqrt(vt / rt**2 + vc / rc**2)
    low, high = value - z * se, value + z * se
    return {**out, "lift": value, "se": se, "ci_low": low, "ci_high": high, "significant": bool(low > 0 or high < 0)}


def arm_summary(users: pd.DataFrame) -> pd.DataFrame:
    """Per arm: impressions, users, clicks, conversions, revenue, CTR, CVR and RPM."""
    sums = users.groupby("arm").agg(impressions=("impressions", "sum"), users=("user_id", "nunique"),
                                    clicks=("clicks", "sum"), conversions=("conversions", "sum"),
                                    revenue=("revenue", "sum"))
    sums["ctr"] = sums["clicks"] / sums["impressions"]
    sums["cvr"] = sums["conversions"] / sums["clicks"].where(sums["clicks"] > 0)
    sums["rpm"] = 1000 * sums["revenue"] / sums["impressions"]
    return sums.reset_index()


def lifts(users: pd.DataFrame, control: str = "control") -> pd.DataFrame:
    """Every other arm's lift over ``control`` per metric (empty when the control arm is absent)."""
    arms = sorted(a for a in users["arm"].unique() if a not in (control, NO_ARM))
    if control not in set(users["arm"]):
        return pd.DataFrame(columns=["arm", "metric", "control_value", "value", "lift", "se", "ci_low", "ci_high",
                                     "significant"])
    base = users[users["arm"] == control]
    rows = [{"arm": arm, **lift(users[users["arm"] == arm], base, metric)} for arm in arms for metric in METRICS]
    return pd.DataFrame(rows)


def expected_metrics(impressions: pd.DataFrame) -> pd.DataFrame:
    """Per arm, the metrics the true probabilities (``true_pctr``, ``true_pcvr``) of the impressions shown imply."""
    e = impressions.assign(e_click=impressions["true_pctr"],
                           e_conv=impressions["true_pctr"] * impressions["true_pcvr"])
    e["e_rev"] = e["e_conv"] * e["price"].astype(float)
    sums = e.groupby("arm").agg(n=("e_click", "size"), clicks=("e_click", "sum"), conv=("e_conv", "sum"),
                                rev=("e_rev", "sum"))
    return pd.DataFrame({"arm": sums.index, "ctr": (sums["clicks"] / sums["n"]).to_numpy(),
                         "cvr": (sums["conv"] / sums["clicks"]).to_numpy(),
                         "rpm": (1000 * sums["rev"] / sums["n"]).to_numpy()}).reset_index(drop=True)


def with_truth(lift_rows: pd.DataFrame, expected: pd.DataFrame, control: str) -> pd.DataFrame:
    """``lift_rows`` with the true lift (expected metric of the arm over the control's) and whether the interval
    covers it."""
    if lift_rows.empty or control not in set(expected["arm"]):
        return lift_rows.assign(true_lift=math.nan, covered=False)
    exp = expected.set_index("arm")
    true = [exp.at[a, m] / exp.at[control, m] - 1 if a in exp.index else math.nan
            for a, m in zip(lift_rows["arm"], lift_rows["metric"], strict=True)]
    out = lift_rows.assign(true_lift=true)
    out["covered"] = (out["ci_low"] <= out["true_lift"]) & (out["true_lift"] <= out["ci_high"])
    return out


def analyze(impressions: pd.DataFrame, control: str = "control") -> dict:
    """The whole report on impressions (``arm, user_id, clicked, converted, price``; ``true_pctr``, ``true_pcvr``
    when the truth is known): ``{"arms": [...], "lifts": [...], "expected": [...] or None}``."""
    users = user_totals(impressions)
    rows = lifts(users, control)
    expected = None
    if {"true_pctr", "true_pcvr"} <= set(impressions) and impressions["true_pctr"].notna().any():
        known = impressions[impressions["true_pctr"].notna()]
        expected = expected_metrics(known)
        rows = with_truth(rows, expected, control)
    return {"control": control, "arms": arm_summary(users).to_dict("records"), "lifts": rows.to_dict("records"),
            "expected": None if expected is None else expected.to_dict("records")}


# -- runtime ------------------------------------------------------------------------------------------------------


def load_impressions(settings: Settings, since_ms: int | None = None, matured_only: bool = False,
                     truth: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Logged impressions (one per id) with their labels (and truth); counts of what was left out."""
    log = read_prediction_log(settings, since_ms, label="ab_report").drop_duplicates("impression_id")
    labels = label_table(read_matured(settings, since_ms, "ab_report"), read_examples(settings, since_ms, "ab_report"))
    frame = log.merge(labels, on="impression_id", how="left")
    known = frame["converted"].notna() if matured_only else frame["clicked"].notna()
    counts = {"logged": int(len(frame)), "pending_labels": int((~known).sum())}
    frame = frame[known].copy()
    conv = frame["converted"] if matured_only else frame["converted_any"]
    frame["converted"] = conv.fillna(0).astype(bool)
    frame["clicked"] = frame["clicked"].astype(bool)
    frame["arm"] = frame["arm"].replace("", NO_ARM)
    if truth is not None:
        t = pd.read_parquet(truth, columns=["impression_id", "true_pctr", "true_pcvr"])
        frame = frame.merge(t.drop_duplicates("impression_id"), on="impression_id", how="left")
        counts["with_truth"] = int(frame["true_pctr"].notna().sum())
    return frame, counts


def plot_lifts(rows: pd.DataFrame) -> str:
    if rows.empty:
        return ""
    fig, axes = figure(4 * len(METRICS), 3, 1, len(METRICS))
    for ax, metric in zip(axes[0], METRICS, strict=True):
        part = rows[rows["metric"] == metric].reset_index(drop=True)
        y = np.arange(len(part))
        err = np.vstack([part["lift"] - part["ci_low"], part["ci_high"] - part["lift"]]).astype(float)
        ax.errorbar(part["lift"].astype(float), y, xerr=err, fmt="o", capsize=4, label="observed, 95 % CI")
        if "true_lift" in part:
            ax.plot(part["true_lift"].astype(float), y, "x", color="red", label="true lift")
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set(yticks=y, yticklabels=part["arm"], title=f"{metric.upper()} lift vs control", xlabel="relative lift")
        ax.legend(fontsize="small")
    return png(fig)


def run(settings: Settings, control: str = "control", truth: Path | None = None, since_ms: int | None = None,
        matured_only: bool = False, out_dir: Path | None = None) -> dict:
    out_dir = out_dir or settings.var_dir / "ab"
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, counts = load_impressions(settings, since_ms, matured_only, truth)
    result = {"counts": counts, "matured_only": matured_only, "truth": str(truth) if truth else None,
              **(analyze(frame, control) if len(frame) else
                 {"control": control, "arms": [], "lifts": [], "expected": None, "status": "no data"})}
    result = json_ready(result)
    (out_dir / "summary.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    arms, rows = pd.DataFrame(result["arms"]), pd.DataFrame(result["lifts"])
    note = "" if not rows.empty else (f"<p><b>no lift</b>: no control arm {control!r} among the arms "
                                      f"{sorted(arms['arm']) if len(arms) else []}</p>")
    html = ("<html><head><meta charset='utf-8'><title>A/B report</title></head><body><h1>A/B report</h1>"
            f"<p>{counts['logged']:,} logged impressions, {counts['pending_labels']:,} without a known label yet "
            f"(left out){', matured labels only' if matured_only else ''}. Lifts vs <b>{control}</b>: 95 % "
            "confidence intervals by the delta method on per-user totals (users are the randomization unit).</p>"
            + (table_html(arms) if len(arms) else "<p>no data</p>") + note
            + (table_html(rows) if len(rows) else "") + plot_lifts(rows)
            + (f"<h2>Expected from the simulator's truth</h2>{table_html(pd.DataFrame(result['expected']))}"
               if result.get("expected") else "") + "</body></html>")
    (out_dir / "report.html").write_text(html)
    for row in result["lifts"]:
        flag = "significant" if row["significant"] else "not significant"
        truth_note = (f", true {row['true_lift']:+.3f} {'covered' if row['covered'] else 'NOT covered'}"
                      if row.get("true_lift") is not None and "covered" in row else "")
        print(f"ab_report: {row['arm']} {row['metric']}: lift {row['lift']:+.3f} "
              f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] {flag}{truth_note}" if row["se"] is not None else
              f"ab_report: {row['arm']} {row['metric']}: not enough data", flush=True)
    print(f"ab_report: wrote {out_dir / 'report.html'} and summary.json", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.ab_report", description=__doc__.split("\n>>>")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", default="control", help="the control arm (default: control)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--run", help="simulator run id: its truth is var/runs/<run>/truth.parquet")
    source.add_argument("--truth", type=Path, help="a truth.parquet (impression_id, true_pctr, true_pcvr)")
    p.add_argument("--since", help="impressions with an event time at or after this (ISO date/time or epoch ms)")
    p.add_argument("--matured-only", action="store_true", help="only impressions whose labels matured")
    p.add_argument("--out", type=Path, help="output folder (default var/ab)")
    args = p.parse_args(argv)
    settings = get_settings()
    truth = args.truth or (settings.runs_dir / args.run / "truth.parquet" if args.run else None)
    if truth is not None and not truth.exists():
        print(f"ab_report: no truth at {truth}", file=sys.stderr)
        return 1
    run(settings, args.control, truth, parse_time_ms(args.since), args.matured_only, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
