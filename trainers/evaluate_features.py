"""Is the feature store worth having? Every model with and without its features, through the real data path:
``make evaluate-features`` (``python -m trainers.evaluate_features``).

A simulated run whose truth has the effects the features are built to see (``Effects.realistic``: fatigue,
recency of clicks in a category, ad novelty, hour of day, advertiser CVR, returning converters) on top of the
latent user x ad part goes through the production path, on topics, a lake and a Feast project of its own:

1. the simulator sends it to Kafka (the campaign catalog first);
2. the real-time feature worker (``streams.realtime_app``) computes the real-time rows and the user's recent ads;
3. bronze, the real-time log, then per day silver and (but for the held-out day) gold, each behind its data-quality
   gate;
4. the point-in-time training-set builder (``batch_jobs.training_set``, every row kept; not for the warm-up days)
   joins each impression to the gold and real-time rows as of its time.

After ``warmup_days`` (processed, so gold has a day behind it, but not trained on), the ``history`` days train
every model (negatives downsampled to ``negative_rate`` in process, as
``trainers.evaluate`` does; undone and calibrated the same way); the last day scores them against the truth of
each impression (the oracle: the true probabilities; and the oracle without the user x ad interaction, the ceiling
of a learner that does not learn it). Each model is trained twice on the same rows: **with** the
feature service's columns (``<view>__<feature>``: gold, real-time and the recent-ads history) and **without**
them (the columns dropped: ids and context only). Models: the ranker (a full retrain), LightGBM on the ranker's
inputs and River FTRL.

Writes ``report.html`` (per model and task: AUC, log loss, ECE; reliability plots) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.settings import Settings, get_settings
from streams.simulator.config import Effects, SimulatorConfig
from trainers.data import InputSpec, encode
from trainers.evaluate import (
    GOALS,
    LIGHTGBM,
    NO_INTERACTION,
    ORACLE,
    OURS,
    RIVER,
    THREADS,
    Goal,
    downsample,
    fit_lightgbm,
    fit_ranker,
    goals_table,
    headline,
    in_window_share,
    json_default,
    oracle_additive,
    oracle_without_interaction,
    task_metrics,
)
from trainers.river_baseline import RiverBaseline

DAY_MS = 86_400_000


@dataclass(frozen=True)
class FeatureScale:
    users: int
    ads: int
    impressions_per_hour: float
    history_days: int
    epochs: int  # at most (early stopping may pick fewer: trainers/train.py)
    # Days simulated and processed before the history, whose rows train nothing: gold describes the days
    # before its stamp, so without them the first history day would have no gold row at all.
    warmup_days: int = 1
    # Simulated seconds per wall second when sending. The real-time worker writes a row per touched entity per
    # batch, so an unpaced replay (hours of event time per batch) would give coarser rows than live serving.
    speed: float = 2_880.0


SCALES = {
    "ci": FeatureScale(users=1_500, ads=300, impressions_per_hour=1_500, history_days=2, epochs=1),
    "full": FeatureScale(users=20_000, ads=2_000, impressions_per_hour=8_000, history_days=5, epochs=2,
                         speed=1_440.0),
}


def run_settings(run_id: str) -> Settings:
    """The run's own topics, lake, var folder and Feast project; a one-hour conversion window, so labels
    mature inside the run (the demo's choice)."""
    from infra.topics import with_topic_prefix

    base = get_settings()
    return with_topic_prefix(base, run_id).model_copy(update={
        "var_dir": base.var_dir / run_id, "feast_project": run_id,
        "windows": base.windows.model_copy(update={"conversion_window_s": 3600.0})})


def through_the_pipeline(settings: Settings, cfg: SimulatorConfig,
                         warmup_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Send the run, compute its features and build its training sets; (rows of every day after the first
    ``warmup_days`` with their features, the truth)."""
    from batch_jobs import bronze, gold, realtime_log, silver
    from batch_jobs import training_set as ts
    from infra.demo import wait_until_still
    from infra.spark_session import spark_session
    from infra.topics import group_lag
    from label_joiner.worker import start_worker, stop_worker
    from streams.simulator.batched import send_batched
    from streams.simulator.run import generate, send_catalog
    from trainers.datasets import read_days

    gen = generate(cfg, settings)
    send_catalog(gen.campaigns, settings)
    group = f"realtime-{cfg.prefix}"
    worker = start_worker(settings, group, settings.var_dir / "realtime.log", app_module="streams.realtime_app")
    try:
        counts = send_batched(gen.schedule, settings, speed=cfg.speed, start_ms=cfg.start_ms)
        print(f"evaluate-features: sent {counts}", flush=True)
        topics = settings.topics
        inputs = [topics.impressions, topics.clicks]
        wait_until_still(settings, f"{group}-fanout", inputs, timeout_s=900)
        done, total = group_lag(settings, f"{group}-fanout", inputs)
        if done < total:
            raise RuntimeError(f"the real-time worker read {done:,} of {total:,} events: see "
                               f"{settings.var_dir / 'realtime.log'}")
        wait_until_still(settings, f"{group}-entities", [topics.realtime_entity_events], timeout_s=900)
    finally:
        stop_worker(worker)
    days = [(cfg.start + timedelta(days=d)).date() for d in range(int(cfg.hours // 24))]
    bronze.run(None, settings)
    realtime_log.run(None, settings)
    for ds in days:
        silver.run(ds, settings)
        # Gold of ``ds`` is stamped at the day's end, so it serves the next day's impressions: the held-out (last)
        # day's gold would serve none.
        if ds != days[-1]:
            print(f"evaluate-features: gold {ds}: {gold.run(ds, settings)}", flush=True)
    # The warm-up days train nothing: their training rows are not built.
    trained = days[warmup_days:]
    print(f"evaluate-features: training set {ts.run(trained[0], trained[-1], settings, negative_rate=1.0)}",
          flush=True)
    frame = read_days(spark_session("evaluate_features", settings), settings, [d.isoformat() for d in trained])
    return frame, gen.truth


def without_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The same rows with the feature service's columns dropped (ids and context only)."""
    return frame.drop(columns=[c for c in frame.columns if "__" in c])


def river_scores(history: pd.DataFrame, held: pd.DataFrame) -> dict[str, np.ndarray]:
    river = RiverBaseline()
    river.learn_many(history)
    pred = river.predict_many(held)
    out = {"ctr": pred["ctr"].to_numpy(), "ctcvr": pred["ctcvr"].to_numpy()}
    out["cvr"] = np.clip(out["ctcvr"] / np.maximum(out["ctr"], 1e-6), 0, 1)
    return out


def world_config(settings: Settings, scale: FeatureScale, seed: int, start: datetime) -> SimulatorConfig:
    """The features world of ``seed``: the truth has the effects the features are built to see."""
    return SimulatorConfig(seed=seed, run_id=settings.feast_project, start=start,
                           hours=24.0 * (scale.warmup_days + scale.history_days + 1), users=scale.users,
                           ads=scale.ads,
                           impressions_per_hour=scale.impressions_per_hour, ctr=0.05, cvr=0.1, neg_rate=0.02,
                           drift_logit_per_day=0.0, speed=scale.speed, prediction_log=False,
                           effects=Effects.realistic())


def split_world(frame: pd.DataFrame, truth: pd.DataFrame, cfg: SimulatorConfig,
                scale: FeatureScale) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training-set rows with their labels and the oracle's probabilities, split into (history days, the
    held-out day); the warm-up days train nothing."""
    truth = truth.set_index("impression_id")
    share = in_window_share(truth)
    frame = frame.sort_values(["impression_time_ms", "impression_id"], kind="stable").reset_index(drop=True)
    frame["oracle_ctr"] = truth["true_pctr"].reindex(frame["impression_id"]).to_numpy()
    frame["oracle_cvr"] = truth["true_pcvr"].reindex(frame["impression_id"]).to_numpy() * share
    frame["converted"] = frame["converted"].fillna(False).astype(bool)
    # Hides and reports as silver counted them (the joiner's rules), and the oracle's pNeg.
    frame["negative"] = pd.array(frame["negative_feedback"], dtype="boolean").fillna(False).to_numpy(dtype=bool)
    frame["oracle_neg"] = truth["true_pneg"].reindex(frame["impression_id"]).to_numpy()
    additive = oracle_without_interaction(truth, share).reindex(frame["impression_id"])
    for column in additive:
        frame[column] = additive[column].to_numpy()
    day = (frame["impression_time_ms"].to_numpy() - cfg.start_ms) // DAY_MS
    first, last = scale.warmup_days, scale.warmup_days + scale.history_days
    history, held = frame[(day >= first) & (day < last)], frame[day == last].reset_index(drop=True)
    print(f"evaluate-features: {len(frame):,} training-set rows ({len(truth):,} impressions simulated); history "
          f"{len(history):,}, held-out {len(held):,}; oracle matched {frame['oracle_ctr'].notna().mean():.4f}",
          flush=True)
    return history, held


def evaluate_world(settings: Settings, scale: FeatureScale, seed: int, rate: float, start: datetime) -> dict:
    """One world through the pipeline; per model, with and without features, the held-out day's metrics."""
    cfg = world_config(settings, scale, seed, start)
    history, held = split_world(*through_the_pipeline(settings, cfg, scale.warmup_days), cfg, scale)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    oracle = {"ctr": held["oracle_ctr"].to_numpy(), "cvr": held["oracle_cvr"].to_numpy()}
    oracle["ctcvr"] = oracle["ctr"] * oracle["cvr"]
    oracle["neg"] = held["oracle_neg"].to_numpy()
    scores = {"(a) oracle": oracle, NO_INTERACTION: oracle_additive(held)}
    rows = {name: task_metrics(held, p) for name, p in scores.items()}
    for label, view in (("with features", lambda f: f), ("ids and context only", without_features)):
        train, test = downsample(view(history), rate), encode(view(held), spec)
        torch.manual_seed(seed)
        ranker = fit_ranker(train, spec, settings, scale.epochs, rate)
        peer = fit_lightgbm(train, spec, settings, rate, seed)
        for name, p in ((f"ranker, {label}", ranker.score(test)), (f"lightgbm, {label}", peer.score(test)),
                        (f"river, {label}", river_scores(view(history), view(held)))):
            rows[name] = task_metrics(held, p)
            scores[name] = p
            print(f"evaluate-features: {name}: CTR AUC {rows[name]['ctr']['auc']:.4f}, "
                  f"CVR AUC {rows[name]['cvr']['auc']:.4f}", flush=True)
    clicked = held["clicked"].to_numpy()
    labels = {"ctr": held["clicked"].to_numpy(float), "cvr": held["converted"].to_numpy(float)[clicked],
              "ctcvr": held["converted"].to_numpy(float)}
    picks = {"ctr": slice(None), "cvr": clicked, "ctcvr": slice(None)}
    reliability = {task: {name: (y, p[task][picks[task]]) for name, p in scores.items()}
                   for task, y in labels.items()}
    views = sorted({c.split("__")[0] for c in held.columns if "__" in c})
    coverage = {v: float(held[[c for c in held.columns if c.startswith(f"{v}__")]].notna().any(axis=1).mean())
                for v in views}
    return {"rows": rows, "reliability": reliability, "feature_coverage": coverage, "rows_held_out": len(held)}


def _gain(model: str, task: str, metric: str) -> Goal:
    """With features minus without (AUC), or without minus with (log loss): what the features add."""
    sign = -1.0 if metric == "nll" else 1.0
    name = f"{task.upper()} {'AUC' if metric == 'auc' else 'log loss'}: {model} gains from the features"
    return Goal(name, lambda r: sign * (r[f"{model}, with features"][task][metric]
                                        - r[f"{model}, ids and context only"][task][metric]), 0.0)


FEATURE_GOALS = tuple(_gain(m, t, k) for m in ("ranker", "lightgbm") for t in ("ctr", "cvr") for k in ("auc", "nll"))


def peer_goals() -> tuple[Goal, ...]:
    """The issue's goals (``trainers.evaluate.GOALS``) on the with-features rows: the ranker against LightGBM and
    River, the share of the River-to-oracle gap, calibration."""
    names = {OURS: "ranker, with features", LIGHTGBM: "lightgbm, with features", RIVER: "river, with features",
             ORACLE: "(a) oracle"}
    return tuple(Goal(g.name.replace("full retrain", "ranker with features"),
                      lambda r, g=g: g.value({k: r[v] for k, v in names.items()}), g.bar, g.lower) for g in GOALS)


def write_report(result: dict, out_dir: Path) -> Path:
    from trainers.calibration import reliability_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    goals = pd.DataFrame(result["goals"]).drop(columns="values")
    head = pd.DataFrame(result["headline"]).drop(columns="values").pivot_table(
        index=["model", "task"], columns="metric", values=["mean", "half"], sort=False)
    plots = [reliability_plot(curves, out_dir / f"reliability_{task}.png", f"{task.upper()}, held-out day")
             for task, curves in result["reliability"].items()]
    coverage = pd.Series(result["feature_coverage"]).to_frame("share of held-out rows with a value")
    html = ("<html><head><title>Features: with and without</title></head><body>"
            "<h1>Every model with and without the feature service's features</h1>"
            f"<p>scale {result['scale']}, {result['worlds']} world(s), {result['seconds']:.0f} s, through the "
            "real pipeline (Kafka, real-time worker, bronze/silver/gold, the point-in-time training-set builder)</p>"
            f"<h2>Goals (mean over worlds, 95 % t-interval)</h2>{goals.to_html(float_format='%.4f', index=False)}"
            f"<h2>Every model, held-out day (mean and 95 % half-width)</h2>{head.to_html(float_format='%.4f')}"
            f"<h2>Feature coverage (first world)</h2>{coverage.to_html(float_format='%.4f')}"
            f"<h2>Reliability per task (first world)</h2>{''.join(f'<img src={p.name!r}/>' for p in plots)}"
            "</body></html>")
    path = out_dir / "report.html"
    path.write_text(html)
    (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in result.items() if k != "reliability"},
                                                     indent=1, default=json_default))
    return path


def run(scale_name: str = "ci", seed: int = 11, worlds: int = 1, negative_rate: float = 0.25,
        out_dir: Path | None = None) -> dict:
    """``worlds`` runs through the pipeline (seeds ``seed``, ``seed + 1``, ...), each ending at the last UTC
    midnight; the tables, goals and report (``out_dir``, default ``var/evaluation/features``)."""
    scale = SCALES[scale_name]
    began = time.monotonic()
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=scale.warmup_days + scale.history_days + 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    per_world = []
    try:
        for i in range(worlds):
            settings = run_settings(f"evalfeat{int(time.time())}s{seed + i}")
            per_world.append(evaluate_world(settings, scale, seed + i, negative_rate, start))
    finally:
        torch.set_num_threads(previous)
    rows = [w["rows"] for w in per_world]
    result = {"scale": {"name": scale_name, **asdict(scale)}, "seed": seed, "worlds": worlds,
              "seconds": time.monotonic() - began, "per_world_rows": rows, "headline": headline(rows),
              "goals": [g.check(rows) for g in FEATURE_GOALS + peer_goals()],
              "feature_coverage": per_world[0]["feature_coverage"], "reliability": per_world[0]["reliability"]}
    path = write_report(result, out_dir or get_settings().var_dir / "evaluation" / "features")
    print(goals_table(result["goals"]), flush=True)
    print(f"evaluate-features: report {path}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.evaluate_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--worlds", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    run(a.scale, a.seed, a.worlds, out_dir=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

