"""The main job, end to end on the local stack: ``python -m infra.demo --hours 3``.

Creates this demo's own topics (``demo<time>-impressions``, ...) and lake (``var/demo<time>/``), starts the
label joiner and the real-time feature worker, simulates the last ``--hours`` of traffic into Kafka (paced:
a simulated day in two minutes), waits until both workers have caught up, then runs the batch side:
bronze -> silver -> gold (each day checked by the data-quality suites) -> ``feast apply`` + ``feast
materialize`` -> the point-in-time training set, reads one ranking request through the online read path,
then trains the ranker by its three cadences (a full retrain over the first day, a warm start over the
second, online updates over the joiner's training examples) and prints where every output is.

The simulated hours straddle a UTC midnight (they end at most a few hours ago), so the run has two days:
one for the full retrain and one for the warm start.

The demo's conversion window is one hour (the default is seven days), so its silver labels mature within
the run; everything else uses the settings as they are.

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
from streams.simulator.__main__ import main as simulate


def wait_until_caught_up(settings, group: str, timeout_s: float = 300.0) -> None:
    """Wait until the joiner has committed every input event (windows still open close later, in real time:
    the last impressions' click windows end ten minutes after they happened)."""
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


def wait_until_still(settings, group: str, topics: list[str], timeout_s: float = 300.0) -> None:
    """Wait until a group's committed offsets stop moving (its transactional inputs end in markers)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = group_lag(settings, group, topics)
        if now == last and now[0] > 0:
            return
        last = now
        time.sleep(3)
    print(f"demo: {group} did not settle in time; see its log")


def batch_side(settings, start: datetime, end: datetime) -> dict[str, str]:
    """bronze -> silver -> gold (with quality) -> feast apply + materialize -> training set."""
    from batch_jobs import bronze, gold, realtime_log, silver, training_set
    from batch_jobs.days import days
    from feature_repo.cli import feast

    first, last = start.date(), end.date()
    bronze.run(None, settings)
    realtime_log.run(None, settings)  # the real-time rows, for point-in-time joins
    for ds in days(first, last):
        silver.run(ds, settings)
        print(f"demo: gold {ds}: {gold.run(ds, settings)}", flush=True)
    feast(["apply"], settings)
    feast(["materialize", (start - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"),
           (end + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S")], settings)
    print(f"demo: training set {training_set.run(first, last, settings)}", flush=True)
    lake = settings.lake_dir
    return {"bronze tables": f"{lake}/bronze/<topic>", "silver labels": silver.silver_path(settings),
            "gold features": f"{lake}/gold/<view>",
            "real-time feature log": f"{lake}/realtime/<view>", "training set": f"{lake}/training/training_set",
            "data-quality reports": f"{settings.var_dir}/quality/gx/uncommitted/data_docs/local_site/index.html",
            "quarantine markers": f"{lake}/_quarantine", "feast registry": f"{settings.var_dir}/feast/",
            "online store": f"Redis {settings.redis.host}:{settings.redis.port}, project {settings.feast_project}"}


def training_side(settings) -> dict[str, str]:
    """Full retrain over the first training-set day, warm start over the next, then online updates."""
    from infra.spark_session import spark_session
    from trainers import full_retrain, online, warm_start
    from trainers.datasets import available_days
    from trainers.registry import Registry

    have = available_days(spark_session("demo", settings), settings)
    full_retrain.run(settings, end=have[0], days=1)
    if len(have) > 1:
        warm_start.run(settings, ds=have[-1])
    versions = online.run(settings, publish_every_s=5.0, idle_exit_s=10.0)
    registry = Registry(settings.registry_dir)
    print(f"demo: online trainer published {len(versions)} versions; promoted {registry.promoted()}", flush=True)
    for meta in registry.list():
        print(f"  {meta['version']:<16} parent {str(meta.get('parent')):<16} data {meta.get('data_range', '-')}")
    root = settings.registry_dir
    return {"model registry": f"{root} (python -m trainers.registry --root {root} list)"}


def straddling_start(hours: float, now: datetime) -> datetime:
    """The start of ``hours`` of simulated traffic that cross the last UTC midnight at their middle and end
    before ``now``."""
    half = timedelta(hours=hours / 2)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if now - midnight < half:
        midnight -= timedelta(days=1)
    return midnight - half


def one_request(settings, truth_path) -> None:
    """Serve one ranking request (a user and up to 500 ads) through the online read path."""
    import pandas as pd

    from feature_repo.online import OnlineReader

    truth = pd.read_parquet(truth_path, columns=["user_id", "ad_id"])
    ads = truth["ad_id"].drop_duplicates().head(500).tolist()
    reader = OnlineReader(settings)
    reader.features(int(truth["user_id"].iloc[0]), ads)  # the first request loads the ads
    t0 = time.perf_counter()
    got = reader.features(int(truth["user_id"].iloc[0]), ads).to_feast_dict()
    print(f"demo: one request, 1 user x {len(ads)} ads, {len(got)} columns in {1000 * (time.perf_counter() - t0):.2f} "
          f"ms (ad features at most {reader.staleness_s:.0f} s stale)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--speed", type=float, default=720.0)
    a = p.parse_args(argv)
    run_id = f"demo{int(time.time())}"
    base = get_settings()
    settings = with_topic_prefix(base, run_id).model_copy(update={
        "var_dir": base.var_dir / run_id, "feast_project": run_id,
        "windows": base.windows.model_copy(update={"conversion_window_s": 3600.0})})
    joiner_group, realtime_group = f"label-joiner-{run_id}", f"realtime-{run_id}"
    joiner = start_worker(settings, joiner_group, settings.var_dir / "label_joiner.log")
    realtime = start_worker(settings, realtime_group, settings.var_dir / "realtime.log",
                            app_module="streams.realtime_app")
    print(f"demo: label joiner (pid {joiner.pid}) and real-time features (pid {realtime.pid}) started, topics "
          f"{run_id}-*, logs in {settings.var_dir}", flush=True)
    # The simulated hours end before now: every record's timestamp (its simulated delivery) lies in the past.
    start = straddling_start(a.hours, datetime.now(UTC))
    try:
        simulate(["--hours", str(a.hours), "--speed", str(a.speed), "--start", start.isoformat(),
                  "--run-id", run_id], settings)
        wait_until_caught_up(settings, joiner_group)
        wait_until_still(settings, f"{realtime_group}-entities", [settings.topics.realtime_entity_events])
    finally:
        stop_worker(joiner)
        stop_worker(realtime)
    print(f"\nWhat landed in each topic of this demo ({run_id}-*; transaction markers count as messages):")
    for name, count in topic_counts(settings).items():
        print(f"  {name:<34} {count:>10,} messages")
    end = start + timedelta(hours=a.hours)
    where = batch_side(settings, start, end)
    one_request(settings, settings.runs_dir / run_id / "truth.parquet")
    where.update(training_side(settings))
    print("\nWhere the outputs are:")
    for what, path in where.items():
        print(f"  {what:<34} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
