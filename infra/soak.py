"""``make soak``: weeks of simulated traffic through the always-on processes, compressed into one run.

The simulator sends ``--days`` simulated days (default 30) with the batched producer, paced at ``--rate`` events a
second, into this run's own topics (``soak<time>-*``, retention raised so that month-old records are kept), while
the label joiner, the real-time feature worker and the online trainer (ids and context: the open-loop traffic is
the uniform bootstrap, which it does not learn with served features; publishing into this run's registry, which
``registry gc`` prunes as the crontab does) run under a supervisor.

Every ``--sample-every`` seconds it records, against the simulated day being sent:

- resident memory of each process (its whole process group), the broker and Redis;
- consumer lag (records not yet committed) of the joiner, the real-time worker's two stages and the trainer;
- state bytes: each group's state folder, the trainer's example and served-feature stores, Redis' used memory;
- registry bytes.

It writes ``var/soak<time>/soak.csv``, ``soak.png`` (the four panels) and ``soak_report.txt``: per metric its
maximum and its least-squares trend after day 10, and whether it stayed bounded (the trend grows it by at most
``GROWTH`` of its maximum, plus a small absolute slack). State that lives for the conversion window fills during
the first ~9 days (7-day window, a day of lateness, a day of margin) and must be flat after.
"""

from __future__ import annotations

import argparse
import csv
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra.settings import Settings, get_settings
from infra.topics import group_lag, topic_specs, with_topic_prefix

GROWTH = 0.10  # a trend that grows a metric by more than this share of its maximum after the state filled: growing
SLACK = {"rss_mb": 32.0, "lag": 5_000.0, "state_mb": 4.0, "registry_mb": 4.0}  # absolute noise allowed on top


def soak_settings(run_id: str) -> Settings:
    """This run's topics, state, registry and Feast project; the trainer's monitoring group."""
    base = get_settings()
    trainer = base.trainer.model_copy(update={"online_group_id": f"online-trainer-{run_id}"})
    return with_topic_prefix(base, run_id).model_copy(update={
        "var_dir": base.var_dir / run_id, "feast_project": run_id, "trainer": trainer})


def keep_records_for(settings: Settings, days: int) -> None:
    """Raise the retention of this run's time-retained topics to ``days``: the broker deletes records by their
    timestamps, and a month of simulated traffic lies up to ~40 days in the past."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, s.name,
                                            configs={**s.config, "retention.ms": str(days * 86_400_000)})
                             for s in topic_specs(settings) if "retention.ms" in s.config])
    finally:
        admin.close()


def delete_topics(settings: Settings) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**settings.kafka.client_config())
    try:
        prefix = settings.topics.impressions.rsplit("-", 1)[0]
        names = [n for n in admin.list_topics() if n.startswith(prefix + "-")]
        if names:
            admin.delete_topics(names)
    finally:
        admin.close()


def folder_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def group_rss_mb(pid: int | None) -> float:
    """Resident memory of a process and its descendants (a worker and what it started)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 1e6


@dataclass
class Progress:
    """What the sender reached: events sent and the simulated time of the last one (ms)."""

    start_ms: int
    sent: int = 0
    sim_ms: int = 0

    def day(self) -> float:
        return max(self.sim_ms - self.start_ms, 0) / 86_400_000


@dataclass
class Sampler:
    """Samples the metrics every ``every_s`` seconds into ``rows`` (and the CSV) until stopped."""

    settings: Settings
    progress: Progress
    pids: dict[str, Callable[[], int | None]]
    groups: dict[str, tuple[str, list[str]]]  # name -> (group id, topics)
    states: dict[str, Path]
    out: Path
    every_s: float = 5.0
    rows: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self, wall0: float) -> dict:
        import redis

        from infra.kafka_broker import KafkaBroker
        from infra.redis_server import RedisServer

        row: dict = {"wall_s": round(time.monotonic() - wall0, 1), "sim_day": round(self.progress.day(), 3),
                     "sent": self.progress.sent}
        for name, pid in self.pids.items():
            row[f"rss_mb:{name}"] = round(group_rss_mb(pid()), 1)
        # The local servers' pid files are under the base settings' var dir, not this run's.
        row["rss_mb:kafka broker"] = round(group_rss_mb(KafkaBroker(get_settings()).pid()), 1)
        row["rss_mb:redis"] = round(group_rss_mb(RedisServer(get_settings()).pid()), 1)
        for name, (group, topics) in self.groups.items():
            try:
                done, total = group_lag(self.settings, group, topics)
                row[f"lag:{name}"] = total - done
            except Exception as err:  # noqa: BLE001 - the broker may be busy; a missing point, not a failed soak
                print(f"soak: lag of {name} not read: {err!r}", flush=True)
                row[f"lag:{name}"] = None
        for name, path in self.states.items():
            row[f"state_mb:{name}"] = round(folder_mb(path), 2)
        try:
            info = self.settings.redis.client().info("memory")
            row["state_mb:redis used"] = round(info["used_memory"] / 1e6, 2)
        except redis.RedisError:
            row["state_mb:redis used"] = None
        row["registry_mb:registry"] = round(folder_mb(self.settings.registry_dir), 1)
        return row

    def run(self) -> None:
        wall0 = time.monotonic()
        with open(self.out, "w", newline="") as f:
            writer = None
            while not self._stop.is_set():
                row = self.sample(wall0)
                self.rows.append(row)
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                f.flush()
                print("soak: " + ", ".join(f"{k} {v}" for k, v in row.items() if v not in (None, 0, 0.0)),
                      flush=True)
                self._stop.wait(self.every_s)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def verdicts(rows: list[dict], days: float) -> list[tuple[str, float, float, float, bool]]:
    """Per metric, over the days after the state has filled (day 10, or the first third of a shorter run): (name,
    maximum, growth over those days by the least-squares trend, the growth allowed, bounded). A metric is bounded
    when its trend grows by at most ``GROWTH`` of its maximum plus the metric's slack: a sawtooth (memtables
    flushed, files compacted) or noise has no trend, a leak or a falling-behind consumer has one."""
    import numpy as np

    from_day = min(10.0, days / 3)
    after = [r for r in rows if r["sim_day"] >= from_day]
    out = []
    for name in [k for k in rows[0] if ":" in k]:
        points = [(r["sim_day"], r[name]) for r in after if r[name] is not None]
        if len(points) < 3:
            continue
        x, y = np.array(points, dtype=float).T
        growth = float(np.polyfit(x, y, 1)[0] * (x.max() - x.min())) if np.ptp(x) > 0 else 0.0
        allowed = GROWTH * float(y.max()) + SLACK[name.split(":", 1)[0]]
        out.append((name, float(y.max()), growth, allowed, growth <= allowed))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rss_mb", "resident memory (MB)"), ("lag", "consumer lag (records)"),
              ("state_mb", "state (MB on disk; Redis: used memory)"), ("registry_mb", "registry (MB)")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    x = [r["sim_day"] for r in rows]
    for ax, (prefix, label) in zip(axes.flat, panels, strict=True):
        for name in [k for k in rows[0] if k.startswith(prefix + ":")]:
            ax.plot(x, [r[name] if r[name] is not None else float("nan") for r in rows], label=name.split(":", 1)[1])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("simulated day sent")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(days: int = 30, impressions_per_hour: float = 1500.0, rate: float = 4000.0, sample_every_s: float = 5.0,
        gc_every_s: float = 60.0, keep_topics: bool = False, seed: int = 7, drain_timeout_s: float = 900.0) -> Path:
    """The soak; returns its folder (CSV, plot, report, logs)."""
    from infra.chaos import Supervised, launch
    from infra.demo import wait_until_caught_up
    from label_joiner.worker import start_worker
    from streams.simulator.batched import send_batched
    from streams.simulator.config import SimulatorConfig
    from streams.simulator.run import generate, send_catalog
    from trainers.registry import Registry

    run_id = f"soak{int(time.time())}"
    settings = soak_settings(run_id)
    keep_records_for(settings, days + 60)
    out = settings.var_dir
    logs = out / "logs"
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=days + 9)  # every conversion window of the data closes before today
    cfg = SimulatorConfig(run_id=run_id, start=start, hours=days * 24.0, users=50_000, ads=5_000, seed=seed,
                          impressions_per_hour=impressions_per_hour, speed=0)
    t0 = time.monotonic()
    gen = generate(cfg, settings)
    n = len(gen.schedule)
    speed = days * 86_400 / (n / rate)
    print(f"soak: run {run_id}: {days} simulated days, {len(gen.truth):,} impressions, {n:,} deliveries generated "
          f"in {time.monotonic() - t0:.0f} s; sending at {rate:,.0f} events/s (speed {speed:,.0f}x), about "
          f"{n / rate / 60:.0f} min; output in {out}", flush=True)

    joiner_group, realtime_group = f"label-joiner-{run_id}", f"realtime-{run_id}"
    py = sys.executable
    procs = {
        "label joiner": Supervised("label joiner", lambda: start_worker(settings, joiner_group, logs / "joiner.log")),
        "real-time features": Supervised("real-time features", lambda: start_worker(
            settings, realtime_group, logs / "realtime.log", app_module="streams.realtime_app")),
        # Ids and context only: the open-loop simulator's traffic is the uniform bootstrap (no model served it),
        # which the online trainer leaves to the batch line when it learns from served features.
        "online trainer": Supervised("online trainer", lambda: launch(
            [py, "-m", "trainers.online", "--no-features"], settings, logs / "online.log")),
    }
    t = settings.topics
    raw = [t.impressions, t.clicks, t.conversions]
    sampler = Sampler(
        settings, Progress(cfg.start_ms),
        pids={name: (lambda p=p: p.proc.pid if p.proc and p.proc.poll() is None else None)
              for name, p in procs.items()},
        groups={"label joiner": (joiner_group, raw),
                "real-time fan-out": (f"{realtime_group}-fanout", [t.impressions, t.clicks]),
                "real-time entities": (f"{realtime_group}-entities", [t.realtime_entity_events]),
                "online trainer": (settings.trainer.online_group_id, [t.training_examples])},
        states={"label joiner": settings.var_dir / "state" / joiner_group,
                "real-time fan-out": settings.var_dir / "state" / f"{realtime_group}-fanout",
                "real-time entities": settings.var_dir / "state" / f"{realtime_group}-entities",
                "trainer examples": settings.var_dir / "trainers" / "online-state"},
        out=out / "soak.csv", every_s=sample_every_s)
    registry = Registry(settings.registry_dir)
    stop_gc = threading.Event()

    def supervise_and_gc() -> None:  # the supervisor's restarts and the crontab's registry gc, every few seconds
        last_gc = time.monotonic()
        while not stop_gc.wait(2.0):
            for p in procs.values():
                p.ensure()
            if time.monotonic() - last_gc >= gc_every_s:
                last_gc = time.monotonic()
                removed = registry.gc(keep=20)
                if removed:
                    print(f"soak: registry gc removed {len(removed)} versions", flush=True)

    send_catalog(gen.campaigns, settings)
    for p in procs.values():
        p.start()
    thread = sampler.start()
    keeper = threading.Thread(target=supervise_and_gc, daemon=True)
    keeper.start()
    try:
        counts = send_batched(gen.schedule, settings, speed, cfg.start_ms,
                              progress=lambda sent, when: _advance(sampler.progress, sent, when))
        print(f"soak: sent {sum(counts.values()):,} events: {counts}", flush=True)
        wait_until_caught_up(settings, joiner_group, timeout_s=600)
        drain(sampler, timeout_s=drain_timeout_s)
    finally:
        sampler.stop()
        thread.join(timeout=60)
        stop_gc.set()
        keeper.join(timeout=30)
        for p in procs.values():
            p.stop()
    exits = {name: p.exits for name, p in procs.items() if p.exits}
    report(sampler.rows, days, out, run_id, rate, exits)
    if not keep_topics:
        delete_topics(settings)
    return out


def drain(sampler: Sampler, timeout_s: float) -> None:
    """After the traffic: wait until every consumer's lag is small or has stopped falling (it then stays as
    the final point of the plot), at most ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        time.sleep(max(sampler.every_s, 10.0))
        row = sampler.rows[-1] if sampler.rows else {}
        lags = {k: v for k, v in row.items() if k.startswith("lag:") and v is not None}
        if lags and all(v <= 1_000 for v in lags.values()):
            return
        if lags == last:
            print(f"soak: lag stopped falling: {lags}", flush=True)
            return
        last = lags


def _advance(progress: Progress, sent: int, when: int) -> None:
    progress.sent, progress.sim_ms = sent, when


def report(rows: list[dict], days: int, out: Path, run_id: str, rate: float, exits: dict) -> list:
    result = verdicts(rows, days)
    plot(rows, out / "soak.png", f"make soak {run_id}: {days} simulated days at {rate:,.0f} events/s")
    lines = [f"soak {run_id}: {days} simulated days at {rate:,.0f} events/s, {len(rows)} samples; processes that "
             f"exited and were restarted: {exits or 'none'}", "",
             f"after day {min(10, days // 3)} (the state filled):",
             f"{'metric':<40} {'max':>12} {'trend growth':>13} {'allowed':>10}  bounded",
             *(f"{name:<40} {top:>12,.1f} {growth:>13,.1f} {allowed:>10,.1f}  {'yes' if ok else 'NO: growing'}"
               for name, top, growth, allowed, ok in result)]
    text = "\n".join(lines)
    (out / "soak_report.txt").write_text(text + "\n")
    print(text, flush=True)
    print(f"soak: plot {out / 'soak.png'}, samples {out / 'soak.csv'}", flush=True)
    return result


def report_from(folder: Path) -> list:
    """The report and plot again from a run's ``soak.csv`` (``--report <folder>``)."""
    with open(folder / "soak.csv") as f:
        rows = [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]
    import re

    old = (folder / "soak_report.txt").read_text() if (folder / "soak_report.txt").exists() else ""
    found = re.search(r"at ([\d,]+) events/s", old)
    rate = float(found.group(1).replace(",", "")) if found else 0.0
    days = round(max(r["sim_day"] for r in rows))
    return report(rows, days, folder, folder.name, rate, {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--impressions-per-hour", type=float, default=1500.0)
    p.add_argument("--rate", type=float, default=4000.0, help="events a second the simulator sends")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between two samples")
    p.add_argument("--keep-topics", action="store_true", help="keep this run's topics (deleted by default)")
    p.add_argument("--report", type=Path, help="only write the report and plot again from this run folder's CSV")
    a = p.parse_args(argv)
    if a.report:
        report_from(a.report)
        return 0
    run(a.days, a.impressions_per_hour, a.rate, a.sample_every, keep_topics=a.keep_topics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
