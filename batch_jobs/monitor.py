"""The monitoring report: ``python -m batch_jobs.monitor [--since 2026-11-20] [--sample 500]``.

Reads the prediction log, the joiner's outputs (matured labels, training examples), the dead letters, the model
registry, Redis and the serving metrics, and writes ``var/monitor/report.html`` (plots embedded) and
``var/monitor/summary.json``, one section each (a section without input says ``"status": "no data"``):

* ``prediction_shift``: PSI of served pCTR / pCVR per model version against the version's training reference;
* ``calibration``: per task, mean predicted vs observed rate per version and over event-time buckets (CTR on
  impressions whose click label is known, CVR on clicked impressions whose label matured);
* ``feature_freshness``: for the newest logged (user, ad) pairs, the age of each feature view's row in the
  online store (its ``_ts:<view>`` field) at the prediction's event time;
* ``label_join_lag``: how long after the impression its first training example and its matured label came;
* ``dead_letters``: dead letters by source topic, stage and reason, relative to the source topic's records;
* ``scoring_latency``: the serving app's own metrics (``var/serving/metrics.json``);
* ``circuit_breaker``: the promotion, the rollbacks with their reasons, and today's verdict (judged, not acted on).

Times: records carry event times of the (simulated) world; ``--since`` keeps records whose event time
(impression time; a dead letter's arrival time) is at or after it. The summary holds no wall-clock time, so a
replay of the same topics writes the same summary.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from infra.settings import Settings, get_settings
from trainers.circuit_breaker import (
    CVR_CLICK_SHARE,
    TopicTail,
    bin_shares,
    calibration_drift,
    decoded,
    judge,
    parse_time_ms,
    psi,
)
from trainers.registry import Registry, RegistryError

SECTIONS = ("prediction_shift", "calibration", "feature_freshness", "label_join_lag", "dead_letters",
            "scoring_latency", "circuit_breaker")
NO_DATA = "no data"
LABEL = "monitor"
QUANTILES = (50, 90, 99)

LOG_COLUMNS = ["impression_id", "user_id", "ad_id", "advertiser_id", "category_id", "model_version",
               "event_time_ms", "pctr", "pcvr", "explored", "arm", "price", "record_ms"]
MATURED_COLUMNS = ["impression_id", "impression_time_ms", "clicked", "converted", "record_ms"]
EXAMPLE_COLUMNS = ["impression_id", "impression_time_ms", "clicked", "converted", "as_of_ms", "record_ms"]
DEAD_COLUMNS = ["source_topic", "stage", "reason_kind", "arrival_ms"]


# -- reading ------------------------------------------------------------------------------------------------------


def read_frame(settings: Settings, topic: str, name: str, pick: Callable[[dict, object], tuple | None],
               columns: list[str], since_ms: int | None = None, label: str = LABEL) -> pd.DataFrame:
    """Every record of ``topic`` whose schema is ``name``, ``pick``-ed into a frame of ``columns``."""
    tail = TopicTail(settings, topic, label=label)
    try:
        rows = list(decoded(tail.read(), name, pick))
    finally:
        tail.close()
    print(f"{label}: {topic}: {len(rows):,} {name} records", flush=True)
    frame = pd.DataFrame(rows, columns=columns)
    time_col = next((c for c in ("event_time_ms", "impression_time_ms", "arrival_ms") if c in columns), None)
    if since_ms is not None and time_col is not None:
        frame = frame[frame[time_col] >= since_ms].reset_index(drop=True)
    return frame


def read_prediction_log(settings: Settings, since_ms: int | None = None, label: str = LABEL) -> pd.DataFrame:
    def pick(v: dict, r) -> tuple:
        return (v["impression_id"], int(v["user_id"]), int(v["ad_id"]), int(v.get("advertiser_id", 0)),
                int(v.get("category_id", -1)), str(v["model_version"]), int(v["event_time_ms"]), float(v["pctr"]),
                float(v["pcvr"]), bool(v.get("explored", False)), str(v.get("arm", "")), float(v.get("price", 0.0)),
                r.timestamp)

    return read_frame(settings, settings.topics.prediction_log, "prediction_log", pick, LOG_COLUMNS, since_ms,
                      label)


def read_matured(settings: Settings, since_ms: int | None = None, label: str = LABEL) -> pd.DataFrame:
    def pick(v: dict, r) -> tuple:
        return v["impression_id"], int(v["impression_time_ms"]), bool(v["clicked"]), bool(v["converted"]), r.timestamp

    return read_frame(settings, settings.topics.matured_labels, "matured_label", pick, MATURED_COLUMNS, since_ms,
                      label)


def read_examples(settings: Settings, since_ms: int | None = None, label: str = LABEL) -> pd.DataFrame:
    def pick(v: dict, r) -> tuple:
        return (v["impression_id"], int(v["impression_time_ms"]), bool(v["clicked"]), bool(v["converted"]),
                int(v["as_of_ms"]), r.timestamp)

    return read_frame(settings, settings.topics.training_examples, "training_example", pick, EXAMPLE_COLUMNS,
                      since_ms, label)


def read_dead_letters(settings: Settings, since_ms: int | None = None) -> pd.DataFrame:
    def pick(v: dict, _r) -> tuple:
        return str(v["source_topic"]), str(v["stage"]), str(v["reason"]).split(":", 1)[0], int(v["arrival_ms"])

    return read_frame(settings, settings.topics.dead_letters, "dead_letter", pick, DEAD_COLUMNS, since_ms)


def label_table(matured: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    """Per impression the labels known: ``clicked`` (a matured label, else any training example: the joiner emits
    one at the click or when the click window closes), ``converted`` (matured labels only; NaN until then), and
    ``converted_any`` (a conversion seen in either, NaN when none of them names the impression)."""
    ex = examples.groupby("impression_id").agg(clicked_ex=("clicked", "max"), converted_ex=("converted", "max"))
    mat = matured.drop_duplicates("impression_id", keep="last").set_index("impression_id")[["clicked", "converted"]]
    out = ex.join(mat, how="outer")
    clicked = out["clicked"].astype("float64").fillna(out["clicked_ex"].astype("float64"))
    conv_any = np.fmax(out["converted"].astype("float64"), out["converted_ex"].astype("float64"))
    return pd.DataFrame({"impression_id": out.index, "clicked": clicked.to_numpy(),
                         "converted": out["converted"].astype("float64").to_numpy(),
                         "converted_any": conv_any.to_numpy()}).reset_index(drop=True)


# -- helpers ------------------------------------------------------------------------------------------------------


def percentiles(values, qs=QUANTILES) -> dict[str, float] | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if not len(arr):
        return None
    return {"n": int(len(arr)), **{f"p{q}": float(np.percentile(arr, q)) for q in qs}, "max": float(arr.max())}


def figure(width: float = 8, height: float = 4, rows: int = 1, cols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-", border=0)


def no_data(why: str) -> tuple[dict, str]:
    return {"status": NO_DATA, "reason": why}, f"<p><b>no data</b>: {why}</p>"


def references(registry: Registry, versions: list[str]) -> dict[str, dict | None]:
    """Each version's reference (None: not in the registry or registered without one)."""
    out = {}
    for version in versions:
        try:
            out[version] = registry.load(version)[1].get("reference")
        except RegistryError:
            out[version] = None
    return out


# -- sections -----------------------------------------------------------------------------------------------------


def prediction_shift(log: pd.DataFrame, refs: dict[str, dict | None]) -> tuple[dict, str]:
    if log.empty:
        return no_data("the prediction log is empty")
    rows, plotted = [], []
    for version, group in log.groupby("model_version", sort=False):
        shown = group[~group["explored"]]
        ref = refs.get(version)
        row = {"version": version, "impressions": int(len(group)), "explored": int(group["explored"].sum()),
               "mean_pctr": float(shown["pctr"].mean()) if len(shown) else None,
               "ref_mean_pctr": ref["calibration"]["ctr"]["mean_p"] if ref else None,
               "psi_ctr": psi(ref["bins"]["ctr"], shown["pctr"].to_numpy()) if ref and len(shown) else None,
               "psi_cvr": psi(ref["bins"]["cvr"], shown["pcvr"].to_numpy()) if ref and len(shown) else None,
               "reference": "yes" if ref else "none (not in the registry, or registered without one)"}
        rows.append(row)
        if ref and len(shown) and len(plotted) < 4:
            plotted.append((version, ref["bins"]["ctr"], shown["pctr"].to_numpy()))
    table = pd.DataFrame(rows).sort_values("impressions", ascending=False)
    html = ("<p>PSI of the scores served (explored impressions left out: their pCTR is a Thompson sample) "
            "against the version's reference, its calibrated scores on the held-out rows it was calibrated on. "
            "Below 0.1: stable; 0.1-0.25: moderate shift; above 0.25: a large shift.</p>" + table_html(table))
    if plotted:
        fig, axes = figure(4 * len(plotted), 3.2, 1, len(plotted))
        for ax, (version, bins, served) in zip(axes[0], plotted, strict=True):
            x = np.arange(len(bins["shares"]))
            ax.bar(x - 0.2, bins["shares"], 0.4, label="training reference")
            ax.bar(x + 0.2, bin_shares(bins["edges"], served), 0.4, label="served")
            ax.set(title=version, xlabel="pCTR decile of the reference", ylabel="share")
            ax.legend(fontsize="small")
        html += png(fig)
    return {"status": "ok", "versions": table.to_dict("records")}, html


def calibration(log: pd.DataFrame, labels: pd.DataFrame, threshold: float, min_n: int = 200) -> tuple[dict, str]:
    if log.empty or labels.empty:
        return no_data("no prediction-log records" if log.empty else "no labels yet (matured or training examples)")
    joined = log[~log["explored"]].merge(labels, on="impression_id", how="inner")
    if joined.empty:
        return no_data("no logged impression has a label yet")
    per_version = {}
    for version, g in joined.groupby("model_version", sort=False):
        ctr, cvr = g[g["clicked"].notna()], g[(g["clicked"] == 1) & g["converted"].notna()]
        per_version[version] = {
            "ctr": vars(calibration_drift("ctr", ctr["pctr"].to_numpy(), ctr["clicked"].to_numpy(), min_n=min_n,
                                          threshold=threshold)),
            "cvr": vars(calibration_drift("cvr", cvr["pcvr"].to_numpy(), cvr["converted"].to_numpy(),
                                          min_n=max(1, min_n // CVR_CLICK_SHARE), threshold=threshold,
                                          what="matured clicks"))}
    span_h = (joined["event_time_ms"].max() - joined["event_time_ms"].min()) / 3.6e6
    hours = max(1, math.ceil(span_h / 48))
    joined["bucket_ms"] = joined["event_time_ms"] // (hours * 3_600_000) * (hours * 3_600_000)
    buckets = []
    for bucket, g in joined.groupby("bucket_ms"):
        ctr, cvr = g[g["clicked"].notna()], g[(g["clicked"] == 1) & g["converted"].notna()]
        buckets.append({"bucket_start": pd.Timestamp(bucket, unit="ms", tz="UTC").isoformat(),
                        "ctr_n": len(ctr), "ctr_predicted": ctr["pctr"].mean() if len(ctr) else None,
                        "ctr_observed": ctr["clicked"].mean() if len(ctr) else None,
                        "cvr_n": len(cvr), "cvr_predicted": cvr["pcvr"].mean() if len(cvr) else None,
                        "cvr_observed": cvr["converted"].mean() if len(cvr) else None})
    rows = pd.DataFrame([{"version": v, "task": t, **{k: c[k] for k in ("n", "mean_p", "rate", "log_ratio", "z",
                                                                          "status")}}
                         for v, tasks in per_version.items() for t, c in tasks.items()])
    series = pd.DataFrame(buckets)
    fig, axes = figure(10, 3.5, 1, 2)
    times = pd.to_datetime(series["bucket_start"])
    for ax, task in zip(axes[0], ("ctr", "cvr"), strict=True):
        ax.plot(times, series[f"{task}_predicted"].astype(float), marker="o", ms=3, label="mean predicted")
        ax.plot(times, series[f"{task}_observed"].astype(float), marker="o", ms=3, label="observed")
        ax.set(title=f"{task.upper()} per {hours} h of event time", ylabel="rate")
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        ax.legend(fontsize="small")
    html = (f"<p>log(mean predicted / observed), per version: drift beyond +-{threshold:g} with |z| >= 3. CTR on "
            "impressions whose click is known (a matured label or a training example), CVR on clicked impressions "
            "whose label matured.</p>" + table_html(rows) + png(fig))
    return {"status": "ok", "per_version": per_version, "bucket_hours": hours, "buckets": buckets}, html


def _ts_ms(raw: bytes | None) -> float:
    from google.protobuf.timestamp_pb2 import Timestamp

    if raw is None:
        return math.nan
    stamp = Timestamp.FromString(raw)
    return stamp.seconds * 1000.0 + stamp.nanos / 1e6


def feature_freshness(settings: Settings, log: pd.DataFrame, sample: int) -> tuple[dict, str]:
    """Age of each view's row at the prediction's event time, for the newest ``sample`` logged pairs."""
    import redis

    from feature_repo.online import entity_key
    from schemas.features import BY_VIEW

    if log.empty:
        return no_data("the prediction log is empty")
    rows = log.nlargest(sample, "event_time_ms")
    r = settings.redis
    client = redis.Redis(host=r.host, port=r.port, username=r.username, password=r.password, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as err:
        return no_data(f"Redis is not reachable at {r.host}:{r.port}: {err}")
    per_view, ages_by_view = {}, {}
    for view, table in BY_VIEW.items():
        keys, times = [], []
        for row in rows.itertuples(index=False):
            ids = {name: int(getattr(row, name)) for name in table.ENTITIES}
            if any(v < 0 for v in ids.values()):
                continue  # an unknown category or advertiser: no row to look up
            keys.append(entity_key(ids, settings.feast_project))
            times.append(row.event_time_ms)
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, f"_ts:{view}")
        stamps = np.array([_ts_ms(x) for x in pipe.execute()]) if keys else np.zeros(0)
        age_s = (np.asarray(times, dtype=np.float64) - stamps) / 1000.0
        found = ~np.isnan(stamps)
        before = found & (age_s >= 0)
        ages_by_view[view] = age_s[before]
        per_view[view] = {"looked_up": len(keys), "found": int(found.sum()),
                          "missing_share": float(1 - found.mean()) if len(keys) else None,
                          "rewritten_after_share": float((found & (age_s < 0)).sum() / max(found.sum(), 1)),
                          "age_s": percentiles(age_s[before])}
    client.close()
    table = pd.DataFrame([{"view": v, **{k: x for k, x in d.items() if k != "age_s"},
                           **{f"age_{k}_s": x for k, x in (d["age_s"] or {}).items() if k != "n"}}
                          for v, d in per_view.items()])
    html = ("<p>For the newest logged (user, ad) pairs, the age of each feature view's row in the online store "
            "(its <code>_ts:&lt;view&gt;</code>, the event time the row's values are as of) at the prediction's "
            "event time. In the simulated world both are simulated event times: a gold view's age is how long ago "
            "its daily batch cut off (up to a day or two), a real-time view's how long ago the entity's last event "
            "was folded in. The store keeps only the newest row, so a row rewritten after the prediction (its "
            "<code>_ts</code> later than the event time) says nothing of the age served: those are counted "
            "apart (<code>rewritten_after_share</code>).</p>" + table_html(table))
    shown = {v: a for v, a in ages_by_view.items() if len(a)}
    if shown:
        fig, axes = figure(9, 3.5)
        ax = axes[0][0]
        ax.boxplot([np.maximum(a, 1e-3) / 3600 for a in shown.values()], tick_labels=list(shown),
                   orientation="horizontal")
        ax.set(xscale="log", xlabel="age of the row at the prediction (hours, log)")
        html += png(fig)
    return {"status": "ok", "sample": int(len(rows)), "views": per_view}, html


def label_join_lag(log: pd.DataFrame, matured: pd.DataFrame, examples: pd.DataFrame) -> tuple[dict, str]:
    if matured.empty and examples.empty:
        return no_data("the joiner has emitted neither training examples nor matured labels")
    first = examples.sort_values("record_ms").drop_duplicates("impression_id") if len(examples) else examples
    out: dict = {"status": "ok"}
    out["event_time_delay_s"] = {
        "first_training_example": percentiles((first["as_of_ms"] - first["impression_time_ms"]) / 1000.0)}
    out["emission_lag_s"] = {
        "first_training_example": percentiles((first["record_ms"] - first["impression_time_ms"]) / 1000.0),
        "matured_label": percentiles((matured["record_ms"] - matured["impression_time_ms"]) / 1000.0)}
    if len(log):
        ids = log["impression_id"]
        out["coverage"] = {"logged_impressions": int(ids.nunique()),
                           "with_a_training_example": float(ids.isin(examples["impression_id"]).mean()),
                           "with_a_matured_label": float(ids.isin(matured["impression_id"]).mean())}
    rows = [{"measure": m, "output": o, **(p or {})} for m in ("event_time_delay_s", "emission_lag_s")
            for o, p in out[m].items()]
    html = ("<p><b>Event-time delay</b>: the event time a first training example describes (its "
            "<code>as_of_ms</code>: the click, or the end of the click window) minus the impression's: what the "
            "windows and the users' delays impose. <b>Emission lag</b>: the output record's Kafka timestamp minus "
            "the impression's event time. The joiner's producer stamps its outputs with its wall clock when it "
            "emits them, while the simulator stamps inputs with simulated times: the emission lag is the joiner's "
            "real lag only when the simulated world runs in real time (speed 1, ending now); for a replay of the "
            "past it mostly says how far back the replayed world lies.</p>" + table_html(pd.DataFrame(rows)))
    if "coverage" in out:
        html += table_html(pd.DataFrame([out["coverage"]]))
    delays = (first["as_of_ms"] - first["impression_time_ms"]).to_numpy(dtype=np.float64) / 1000.0
    if len(delays):
        fig, axes = figure(7, 3)
        axes[0][0].hist(np.maximum(delays, 1e-3), bins=np.logspace(-3, max(math.log10(delays.max() + 1), 1), 40))
        axes[0][0].set(xscale="log", xlabel="event-time delay of the first training example (s, log)",
                       ylabel="impressions")
        html += png(fig)
    return out, html


def dead_letters(settings: Settings, dead: pd.DataFrame) -> tuple[dict, str]:
    from infra.topics import topic_counts

    if dead.empty:
        return no_data("no dead letters")
    inputs = topic_counts(settings, sorted(dead["source_topic"].unique()))
    grouped = dead.groupby(["source_topic", "stage", "reason_kind"]).size().rename("dead_letters").reset_index()
    grouped["input_records"] = grouped["source_topic"].map(inputs)
    grouped["rate"] = grouped["dead_letters"] / grouped["input_records"].where(grouped["input_records"] > 0)
    grouped = grouped.sort_values("dead_letters", ascending=False)
    by_source = dead.groupby("source_topic").size()
    html = ("<p>Dead letters by source topic, stage and reason (the text before its first colon), over the records "
            "the source topic holds now (topics keep different retentions: a rate over a long span is "
            "approximate).</p>" + table_html(grouped))
    fig, axes = figure(8, 0.35 * min(len(grouped), 15) + 1.2)
    top = grouped.head(15)
    axes[0][0].barh([f"{s} / {k}" for s, k in zip(top["source_topic"], top["reason_kind"], strict=True)],
                    top["dead_letters"])
    axes[0][0].invert_yaxis()
    axes[0][0].set(xlabel="dead letters")
    html += png(fig)
    return {"status": "ok", "total": int(len(dead)), "input_records": inputs,
            "by_source": {k: {"dead_letters": int(v), "rate": v / inputs[k] if inputs.get(k) else None}
                          for k, v in by_source.items()},
            "by_reason": grouped.to_dict("records")}, html


def flatten(value, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON value by dotted path."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {prefix: float(value)}


def scoring_latency(settings: Settings) -> tuple[dict, str]:
    path = settings.var_dir / "serving" / "metrics.json"
    if not path.exists():
        return no_data(f"{path} is absent (the serving app writes it every 10 s while it runs)")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return no_data(f"{path} is unreadable: {err}")
    numbers = flatten(metrics)
    latency = {k: v for k, v in numbers.items() if any(s in k.lower() for s in ("latency", "p50", "p99", "_ms"))}
    rows = pd.DataFrame([{"metric": k, "value": v} for k, v in numbers.items()])
    html = (f"<p>The serving app's metrics ({path.name}, as it last wrote them).</p>"
            + (table_html(rows) if len(rows) else "<p>no numeric metrics</p>"))
    return {"status": "ok" if numbers else NO_DATA, "latency": latency, "metrics": metrics}, html


def circuit_breaker(settings: Settings, registry: Registry, log: pd.DataFrame, labels: pd.DataFrame,
                    refs: dict[str, dict | None]) -> tuple[dict, str]:
    promotion = registry.promotion()
    events = [e for e in registry.events() if e.get("event") in ("promote", "rollback")]
    rollbacks = [{k: e.get(k) for k in ("at_ms", "from", "version", "reason")} for e in events
                 if e["event"] == "rollback"]
    if promotion is None:
        return no_data(f"nothing is promoted in {registry.root}")
    version = promotion["version"]
    served = log[log["model_version"] == version]
    if version not in refs:
        refs = {**refs, **references(registry, [version])}
    verdict = judge(version, refs.get(version), served, labels, settings.serving)
    cfg = settings.serving
    html = (f"<p>Promoted: <b>{version}</b> (reason: {promotion.get('reason') or '-'}); previously promoted: "
            f"{', '.join(promotion.get('previous', [])[-5:]) or 'none'}. Thresholds: PSI {cfg.psi_threshold:g}, "
            f"|log calibration ratio| {cfg.calibration_threshold:g}, at least {cfg.min_breaker_impressions:,} "
            f"served impressions.</p><p>Verdict now (judged here, never acted on; "
            f"<code>python -m trainers.circuit_breaker</code> acts): <b>{verdict.decision}</b>: "
            f"{verdict.reason}</p>")
    html += table_html(pd.DataFrame(rollbacks)) if rollbacks else "<p>No rollback so far.</p>"
    return {"status": "ok", "promoted": version, "previous": promotion.get("previous", []),
            "verdict": verdict.to_json(), "rollbacks": rollbacks,
            "promotions": sum(e["event"] == "promote" for e in events)}, html


# -- the report ---------------------------------------------------------------------------------------------------


def json_ready(value):
    """NaN -> None, numpy scalars -> Python, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run(settings: Settings, since_ms: int | None = None, sample: int = 500, out_dir: Path | None = None) -> dict:
    """Write the report and the summary; return the summary. A section that fails is reported, not raised."""
    out_dir = out_dir or settings.var_dir / "monitor"
    out_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(settings.registry_dir)
    log = read_prediction_log(settings, since_ms)
    matured, examples = read_matured(settings, since_ms), read_examples(settings, since_ms)
    dead = read_dead_letters(settings, since_ms)
    labels = label_table(matured, examples)
    refs = references(registry, list(log["model_version"].unique()))
    builders = {
        "prediction_shift": lambda: prediction_shift(log, refs),
        "calibration": lambda: calibration(log, labels, settings.serving.calibration_threshold),
        "feature_freshness": lambda: feature_freshness(settings, log, sample),
        "label_join_lag": lambda: label_join_lag(log, matured, examples),
        "dead_letters": lambda: dead_letters(settings, dead),
        "scoring_latency": lambda: scoring_latency(settings),
        "circuit_breaker": lambda: circuit_breaker(settings, registry, log, labels, refs),
    }
    summary: dict = {"since_ms": since_ms, "inputs": {"prediction_log": len(log), "matured_labels": len(matured),
                                                      "training_examples": len(examples), "dead_letters": len(dead)}}
    parts = []
    for name in SECTIONS:
        print(f"{LABEL}: {name}", flush=True)
        try:
            section, html = builders[name]()
        except Exception as err:  # noqa: BLE001 - one broken section must not hide the others
            traceback.print_exc()
            section, html = {"status": "error", "error": f"{type(err).__name__}: {err}"}, f"<p>error: {err}</p>"
        summary[name] = section
        parts.append(f"<h2>{name.replace('_', ' ')}</h2>{html}")
    summary = json_ready(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    inputs = ", ".join(f"{k} {v:,}" for k, v in summary["inputs"].items())
    html = ("<html><head><meta charset='utf-8'><title>Monitoring</title><style>body{font-family:sans-serif;"
            "max-width:1100px;margin:auto} table{border-collapse:collapse;font-size:13px} td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd}</style></head><body><h1>Monitoring</h1>"
            f"<p>Records read: {inputs}.</p>" + "".join(parts) + "</body></html>")
    (out_dir / "report.html").write_text(html)
    status = ", ".join(f"{n} {summary[n]['status']}" for n in SECTIONS)
    print(f"{LABEL}: wrote {out_dir / 'report.html'} and summary.json ({status})", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.monitor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--since", help="keep records with an event time at or after this (ISO date/time or epoch ms)")
    p.add_argument("--sample", type=int, default=500, help="logged pairs looked up for feature freshness")
    p.add_argument("--out", type=Path, help="output folder (default var/monitor)")
    args = p.parse_args(argv)
    run(get_settings(), parse_time_ms(args.since), args.sample, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
