"""The main job, end to end on the local stack, the loop closed: ``python -m infra.demo --days 2``.

Creates this demo's own topics (``demo<time>-impressions``, ...) and lake (``var/demo<time>/``), starts the
label joiner and the real-time feature worker, then simulates ``--days`` + 1 days that end at the last UTC
midnight (paced: a simulated day in about a minute):

- day 0 (bootstrap): the simulator's ad server serves uniformly (the candidates as drawn, no model); then
  the batch side (bronze -> silver -> gold with data-quality checks -> ``feast apply`` + the materialization
  ``make materialize`` runs (``feature_repo.materialize``) -> the point-in-time training set) and a full
  retrain, promoted;
- days 1..N: the ad server retrieves each request's candidates with the promoted version's two towers
  (``streams.serving.retrieval``: bid-aware, the users' recent ads from the online store) and asks the scorer for
  every request (in process: features from the online store, the funnel's pre-ranker picks the top 50 for the
  ranker, the promoted model hot-reloaded, eCPM auction with second prices, frequency caps, exploration of new ads,
  an A/B experiment: ``control`` keeps the full retrain, ``treatment`` follows promotions), and the scorer logs
  every shown ad to the prediction log. The circuit breaker checks the promoted model every simulated hour. After
  each day: the batch side, the log-and-replay training set and the skew report, a warm start on the replayed day
  (promoted), and online updates from the joiner's training examples. On the last day a deliberately broken model
  (its CTR logit shifted) is promoted at hour 6: the breaker rolls it back.
- at the end: the monitoring report and the A/B report (checked against the simulator's truth).

The demo's conversion window is one hour (the default is seven days), so its labels mature within the run.
Each demo has topics of its own because the simulator stamps every record with its simulated delivery
time: a second demo on the same topics would send records older than the joiner's clock.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

from infra.settings import get_settings
from infra.topics import group_lag, topic_counts, with_topic_prefix
from label_joiner.worker import start_worker, stop_worker


def wait_until_caught_up(settings, group: str, timeout_s: float = 300.0) -> None:
    """Wait until the joiner has committed every input event (windows still open close when later traffic moves
    the joiner's event-time clock: with every input idle it holds, so the last day's last windows stay open)."""
    t = settings.topics
    outputs = [t.training_examples, t.matured_labels, t.dead_letters]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, total = group_lag(settings, group, [t.impressions, t.clicks, t.conversions])
        print(f"demo: joiner committed {done:,} of {total:,} input events; outputs {topic_counts(settings, outputs)}",
              flush=True)
        if total and done >= total:
            return
        time.sleep(3)
    print("demo: the joiner did not catch up in time; see its log")


def wait_until_still(settings, group: str, topics: list[str], timeout_s: float = 300.0, quiet_s: float = 30.0,
                     poll_s: float = 3.0) -> None:
    """Wait until a group has committed every message in ``topics``, or its committed offsets have not moved for
    ``quiet_s`` (a transactional input can end in a marker the group never commits past). The quiet window must
    outlast the worker's slowest commit interval: a loaded worker commits every few seconds, and two equal polls
    a few seconds apart once ended the wait with 49,000 events still to read."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = group_lag(settings, group, topics)
        done, total = now
        if total > 0 and done >= total:
            return
        if now != last:
            last, since = now, time.monotonic()
        elif done > 0 and time.monotonic() - since >= quiet_s:
            return
        time.sleep(poll_s)
    print(f"demo: {group} did not settle in time; see its log")


def day_batch(settings, ds, *, training_set: bool, replay: bool, before=None) -> None:
    """One day of the batch side: bronze (every topic, incrementally), the real-time log, silver, gold (each
    checked by its data-quality suite), the online store, and the day's training data. ``before(step)``, when
    given, runs before each of ``bronze``, ``realtime_log``, ``silver`` and ``gold`` (the chaos run kills a run
    of it there)."""
    from batch_jobs import bronze, gold, realtime_log, silver
    from feature_repo import materialize
    from feature_repo.cli import feast

    before = before or (lambda _step: None)
    before("bronze")
    bronze.run(None, settings)
    before("realtime_log")
    realtime_log.run(None, settings)
    before("silver")
    silver.run(ds, settings)
    before("gold")
    print(f"demo: gold {ds}: {gold.run(ds, settings)}", flush=True)
    feast(["apply"], settings)
    materialize.command(["materialize", (datetime.combine(ds, datetime.min.time()) - timedelta(days=1)).isoformat(),
                         (datetime.combine(ds, datetime.min.time()) + timedelta(days=2)).isoformat()], settings)
    if training_set:
        from batch_jobs import training_set as ts

        print(f"demo: training set {ts.run(ds, ds, settings)}", flush=True)
    if replay:
        from batch_jobs import replay_set, skew_report

        print(f"demo: replay set {replay_set.run(ds, ds, settings)}", flush=True)
        skew = skew_report.run(ds, ds, settings)
        print(f"demo: skew report {ds}: {skew['rows_compared']:,} impressions; batch features and context equal in at "
              f"least {_pct(skew['batch_min_equal_share'])} of rows (goal 99.9 %), real-time features in at least "
              f"{_pct(skew['realtime_min_equal_share'])}; most differing batch features "
              f"{skew['top_differing_batch'][:3]}, real-time {skew['top_differing_realtime'][:3]}; the cached "
              f"ad-side rows served were {_ages(skew['ad_cache_age_ms'])} (report in {settings.var_dir}/skew)",
              flush=True)


def _ages(age: dict) -> str:
    """The served ad-side rows' ages, beside the read path's documented staleness."""
    stale, ad = age.get("staleness"), age.get("ad")
    if stale is None or ad is None:
        return "(no read times logged)"
    return (f"stale by p50 {stale['p50_ms']:,.0f} ms, p99 {stale['p99_ms']:,.0f} ms, max {stale['max_ms']:,.0f} ms "
            f"(documented staleness {age['documented_staleness_ms']:,} ms; read from Redis p50 {ad['p50_ms']:,.0f} "
            f"ms, p99 {ad['p99_ms']:,.0f} ms before)")


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f} %"


def demo_settings(run_id: str, days: int):
    """This demo's topics, lake, registry and Feast project; a one-hour conversion window; the A/B experiment
    (control: the full retrain, pinned once it exists; treatment: the promoted model); a breaker that decides
    on the demo's small hourly volume."""
    base = get_settings()
    serving = base.serving.model_copy(update={"min_breaker_impressions": 300})
    return with_topic_prefix(base, run_id).model_copy(update={
        "var_dir": base.var_dir / run_id, "feast_project": run_id, "serving": serving,
        "windows": base.windows.model_copy(update={"conversion_window_s": 3600.0})})


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from feature_repo.online import OnlineReader
    from streams.serving.retrieval import Retriever
    from streams.simulator.closed_loop import ClosedLoop, random_policy, run_hours, scorer_policy
    from streams.simulator.config import SimulatorConfig
    from streams.simulator.run import make_producer, send_catalog
    from trainers import full_retrain, online, warm_start
    from trainers.circuit_breaker import ServedLog, check
    from trainers.registry import Registry

    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=2, help="closed-loop days after the bootstrap day")
    p.add_argument("--speed", type=float, default=1440.0, help="simulated seconds per wall-clock second")
    p.add_argument("--impressions-per-hour", type=float, default=600.0)
    p.add_argument("--candidates", type=int, default=100, help="candidate ads per request")
    a = p.parse_args(argv)
    run_id = f"demo{int(time.time())}"
    settings = demo_settings(run_id, a.days)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=a.days + 1)
    cfg = SimulatorConfig(run_id=run_id, start=start, hours=24.0 * (a.days + 1), users=20_000, ads=4_000,
                          impressions_per_hour=a.impressions_per_hour, speed=a.speed, prediction_log=False)
    joiner_group, realtime_group = f"label-joiner-{run_id}", f"realtime-{run_id}"
    joiner = start_worker(settings, joiner_group, settings.var_dir / "label_joiner.log")
    realtime = start_worker(settings, realtime_group, settings.var_dir / "realtime.log",
                            app_module="streams.realtime_app")
    print(f"demo: label joiner (pid {joiner.pid}) and real-time features (pid {realtime.pid}) started, topics "
          f"{run_id}-*, logs in {settings.var_dir}", flush=True)
    registry = Registry(settings.registry_dir)
    loop = ClosedLoop(cfg, settings, candidates=a.candidates)
    producer = make_producer(settings)
    send_catalog(loop.world.campaigns(cfg.start_ms), settings)
    truths, scorer, logger, served_log, metrics, said = [], None, None, None, None, set()
    try:
        # Day 0: uniform serving (no model yet): data free of any model's selection.
        truths.append(run_hours(loop, range(0, 24), random_policy, producer, a.speed))
        settle(settings, joiner_group, realtime_group)
        day_batch(settings, start.date(), training_set=True, replay=False)
        v1 = full_retrain.run(settings, end=start.date().isoformat(), days=1)
        print(f"demo: full retrain {v1} promoted", flush=True)
        scorer, logger, metrics = start_scorer(settings, registry, control=v1)
        # From now on the ad server retrieves each request's candidates with the promoted version's towers (the
        # users' recent ads from the online store) instead of drawing them by popularity.
        loop.source = Retriever(registry, OnlineReader(settings), k=a.candidates)
        served_log = ServedLog(settings)  # the breaker reads the prediction log incrementally
        for day in range(1, a.days + 1):
            ds = (start + timedelta(days=day)).date()
            broken_at = 24 * day + 6 if day == a.days else None

            def each_hour(hour, truth, broken_at=broken_at):
                if hour == broken_at:
                    inject_broken_model(registry)
                logger.flush(10)
                verdict = check(settings, registry, log=served_log)
                key = (verdict.version, verdict.decision, verdict.action)
                if key not in said:  # each version's verdict once, and every action
                    said.add(key)
                    print(f"demo: hour {hour}: {verdict}", flush=True)

            truths.append(run_hours(loop, range(24 * day, 24 * (day + 1)), scorer_policy(scorer), producer,
                                    a.speed, on_hour=each_hour))
            logger.flush(60)
            settle(settings, joiner_group, realtime_group)
            day_batch(settings, ds, training_set=True, replay=True)
            # The online line off the batch head learns the day as it would have live (from the served features
            # in the prediction log); then the daily warm start extends the batch spine with the replayed day,
            # and the next day's line branches off it.
            online.run(settings, publish_every_s=5.0, idle_exit_s=10.0)
            print(f"demo: online updates; promoted {registry.promoted()}", flush=True)
            version = warm_start.run(settings, ds=ds.isoformat(), source="replay")
            print(f"demo: warm start {version} on the replayed {ds}, promoted", flush=True)
    finally:
        if metrics is not None:
            metrics.stop()  # writes the scorer's final metrics
        if served_log is not None:
            served_log.close()
        if scorer is not None:
            scorer.close()
        if logger is not None:
            logger.close()
        producer.close()
        stop_worker(joiner)
        stop_worker(realtime)
    truth = pd_concat(truths)
    truth_path = settings.runs_dir / run_id / "truth.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    truth.to_parquet(truth_path, index=False)
    print(f"\nWhat landed in each topic of this demo ({run_id}-*; transaction markers count as messages):")
    for name, count in topic_counts(settings).items():
        print(f"  {name:<34} {count:>10,} messages")
    print(f"  pending (delivery time after now, not sent): {len(loop.pending):,}; pacing {loop.pacer.summary()}")
    served = truth[truth["model_version"] != "sim-serving-v1"]
    print(f"demo: closed loop served {len(served):,} impressions, CTR {served['clicked'].mean():.4f}, "
          f"true CTR {served['true_pctr'].mean():.4f}; bootstrap CTR "
          f"{truth.loc[truth['model_version'] == 'sim-serving-v1', 'clicked'].mean():.4f}; explored "
          f"{int(np.sum(served['explored']))}", flush=True)
    where = reports(settings, truth_path)
    print("\nModel registry:")
    rolled = registry.rolled_back()
    for meta in registry.list():
        line = f" line {meta['line']}" if meta.get("line") else ""
        flag = " ROLLED BACK" if meta["version"] in rolled else ""
        print(f"  {meta['version']:<16} parent {str(meta.get('parent')):<16} data {meta.get('data_range', '-')}"
              f"{line}{flag}")
    print(f"  batch head {registry.batch_head()}; promoted {registry.promoted()}")
    for event in registry.events()[-8:]:
        print(f"  event {event}")
    print("\nWhere the outputs are:")
    for what, path in where.items():
        print(f"  {what:<34} {path}")
    return 0


def pd_concat(frames):
    import pandas as pd

    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def settle(settings, joiner_group: str, realtime_group: str) -> None:
    wait_until_caught_up(settings, joiner_group)
    wait_until_still(settings, f"{realtime_group}-entities", [settings.topics.realtime_entity_events])


def start_scorer(settings, registry, control: str):
    """The in-process scorer with its prediction logger; A/B: half the users keep ``control``."""
    from streams.serving.app import MetricsWriter, metrics_path
    from streams.serving.prediction_log import PredictionLogger
    from streams.serving.scorer import Scorer

    half = settings.serving.buckets // 2
    experiment = {"control": (0, half, control), "treatment": (half, settings.serving.buckets, "promoted")}
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"experiment": experiment})})
    logger = PredictionLogger(settings).start()
    scorer = Scorer(settings, registry=registry, logger=logger).start()
    metrics = MetricsWriter(scorer, metrics_path(settings)).start()  # scoring latency for the monitoring report
    return scorer, logger, metrics


def inject_broken_model(registry) -> None:
    """Register and promote a copy of the promoted model whose CTR logit is shifted by +2 (a bad push)."""
    from trainers.scoring import load, save

    good = load(registry)
    good.model.shift_ctr_logit(2.0)
    # Its own lineage: not a member of the promoted version's online line, not a delta.
    dropped = ("model_config", "negative_rate", "fnw", "calibrators", "line", "line_root", "delta_of", "delta_depth",
               "gate", "kafka_offsets", "learned_range", "skip_until_ms", "retrieval", "preranker", "extra")
    meta = {k: v for k, v in good.meta.items() if k not in dropped}
    version = save(registry, good, cadence="broken", meta={**meta, "parent": good.version})
    registry.promote(version, reason="demo: a deliberately broken model (CTR logit +2)")
    print(f"demo: promoted the deliberately broken {version}", flush=True)


def reports(settings, truth_path) -> dict[str, str]:
    from batch_jobs import ab_report, monitor

    monitor.run(settings)
    ab_report.run(settings, truth=truth_path)
    return {"monitoring report": f"{settings.var_dir}/monitor/report.html (summary.json beside it)",
            "A/B report": f"{settings.var_dir}/ab/report.html (summary.json beside it)",
            "lake": str(settings.lake_dir), "prediction log": settings.topics.prediction_log,
            "data-quality reports": f"{settings.var_dir}/quality/gx/uncommitted/data_docs/local_site/index.html",
            "skew reports": f"{settings.var_dir}/skew", "truth": str(truth_path),
            "model registry": f"{settings.registry_dir} (python -m trainers.registry --root "
                              f"{settings.registry_dir} list)"}


if __name__ == "__main__":
    sys.exit(main())
