"""``make chaos``: the pipeline on simulated traffic while its processes, the broker, Redis and Spark jobs fail.

Two simulated days on this run's own topics and lake (``chaos<time>-*``, ``var/chaos<time>/``), as the demo runs
them, with a supervisor that restarts whatever exits (as systemd's ``Restart=always`` would):

- day 0 (uniform serving): the label joiner and the real-time feature worker run; the joiner and the
  real-time worker are killed with ``kill -9``, the broker and Redis are stopped and restarted. Then the batch
  side: a bronze run and a gold run are killed in the middle (``kill -9`` of the Spark driver while it lands or
  writes) and re-run; silver, the materialization (``feature_repo.materialize``, as ``make materialize``),
  the training set and a full retrain (promoted).
- day 1 (the ad server asks the scoring service over HTTP; it falls back to uniform serving while the service
  is down): the scoring service with its prediction logger and the online trainer run as well; each is killed
  with ``kill -9`` mid-traffic, the broker and Redis are restarted again, the joiner killed again. Then the
  batch side for day 1.

Then every guarantee is checked against the topics (what the simulator's producer had acknowledged), an
uninterrupted label joiner run on the same inputs (a fresh group and output topics) and a fresh
materialization, and a table printed: faults injected, records checked, records lost (the goal is 0).
``--days-hours`` and ``--impressions-per-hour`` size the run; ``tests/test_chaos.py`` runs a reduced form in CI.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from infra.settings import Settings, get_settings
from infra.topics import ensure_topics, read_topic, with_topic_prefix
from label_joiner.worker import start_worker, stop_worker

FALLBACK_VERSION = "ad-server-fallback"  # what the ad server shows while the scoring service is down (no model)
CLOSING = "closing-"  # the impression ids of the closing traffic (send_closing_traffic)


# -- processes ---------------------------------------------------------------------------------------------------
@dataclass
class Supervised:
    """An always-on process and its supervisor: ``ensure()`` restarts it when it has exited."""

    name: str
    launch: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    kills: int = 0
    exits: int = 0  # exits it was not killed for (a supervisor restarted it)

    def start(self) -> Supervised:
        self.proc = self.launch()
        return self

    def ensure(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            print(f"chaos: {self.name} exited with {self.proc.returncode}: restarting it", flush=True)
            self.exits += 1
            self.start()

    def kill9(self) -> None:
        """``kill -9`` of the whole process group, then the supervisor's restart."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.kills += 1
        print(f"chaos: kill -9 {self.name} (pid {self.proc.pid}); restarting it", flush=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_worker(self.proc)


def launch(cmd: list[str], settings: Settings, log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **settings.to_env(), **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_mid_run(cmd: list[str], settings: Settings, marker: str, log: Path, rng: random.Random) -> dict:
    """Start a Spark job, ``kill -9`` it a moment after it prints ``marker`` (it is then landing or writing)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **settings.to_env()})
    seen = threading.Event()

    def pump() -> None:
        with open(log, "ab") as out:
            for line in proc.stdout:
                out.write(line)
                if marker.encode() in line:
                    seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    t0 = time.monotonic()
    while not seen.wait(0.2):
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            break
    time.sleep(rng.uniform(0.2, 1.5))
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    return {"job": " ".join(cmd[2:4]), "killed_mid_run": running, "after_s": round(time.monotonic() - t0, 1)}


# -- the ad server's side ------------------------------------------------------------------------------------------
def http_policy(url: str, fallbacks: Counter):
    """The ad server asking the scoring service; on an error or a timeout it shows the first candidates (no
    model), as an ad server without a ranker answer does."""
    import requests

    from streams.simulator.closed_loop import random_policy

    session = requests.Session()

    def policy(req) -> list[dict]:
        body = {"request_id": req.request_id, "user_id": int(req.user_id), "placement": req.placement,
                "device": req.device, "event_time_ms": int(req.event_time_ms), "slots": int(req.slots),
                "ad_ids": req.ad_ids.tolist(), "campaign_ids": req.campaign_ids.tolist(),
                "advertiser_ids": req.advertiser_ids.tolist(), "category_ids": req.category_ids.tolist(),
                "bids": req.bids.tolist()}
        try:
            reply = session.post(f"{url}/score", json=body, timeout=2.0)
            reply.raise_for_status()
            shown = reply.json()["shown"]
        except (requests.RequestException, ValueError, KeyError):
            fallbacks["requests"] += 1
            return [{**s, "model_version": FALLBACK_VERSION} for s in random_policy(req)]
        index = {a: i for i, a in enumerate(req.ad_ids.tolist())}
        return [{"impression_id": s["impression_id"], "candidate": index[s["ad_id"]], "position": s["position"],
                 "pctr": s["pctr"], "pcvr": s["pcvr"], "ecpm": s["ecpm"], "price": s["price"],
                 "explored": s["explored"], "model_version": s["model_version"], "arm": s["arm"]} for s in shown]

    return policy


def wait_healthy(url: str, timeout_s: float = 120.0) -> float:
    """Seconds until ``GET /health`` answers 200 (a load balancer's readiness check)."""
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if requests.get(f"{url}/health", timeout=1.0).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the scoring service at {url} is not healthy after {timeout_s:.0f} s")


class AckCounter:
    """The simulator's producer, counting what the broker acknowledged per topic (the records sent)."""

    def __init__(self, producer):
        self.producer, self.acked, self.failed = producer, Counter(), Counter()

    def send(self, topic: str, **kwargs):
        future = self.producer.send(topic, **kwargs)
        future.add_callback(lambda _meta: self.acked.update([topic]))
        future.add_errback(lambda err: self.failed.update([(topic, type(err).__name__)]))
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout)

    def close(self) -> None:
        self.producer.close()


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Fault:
    hour: int
    what: str
    detail: str = ""


@dataclass
class ChaosRun:
    settings: Settings
    faults: list[Fault] = field(default_factory=list)
    truth: object = None
    sent: Counter = field(default_factory=Counter)
    failed_sends: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    service_health: dict = field(default_factory=dict)
    day_ends: list[date] = field(default_factory=list)


def chaos_settings(run_id: str) -> Settings:
    """This run's topics, lake, registry and Feast project; the demo's one-hour conversion window, and
    conversions up to six hours late (so that every window of the data has closed a day later)."""
    base = get_settings()
    serving = base.serving.model_copy(update={"min_breaker_impressions": 300})
    windows = base.windows.model_copy(update={"conversion_window_s": 3600.0, "conversion_lateness_s": 6 * 3600.0})
    return with_topic_prefix(base, run_id).model_copy(update={
        "var_dir": base.var_dir / run_id, "feast_project": run_id, "serving": serving, "windows": windows})


def send_closing_traffic(settings: Settings, producer) -> int:
    """The next live traffic, which the stream processors' event-time clocks wait for to close the last windows
    (with every input idle they hold, so that labels never depend on pauses): once the inputs are idle, one
    impression per partition at the wall clock. Only the run's own data must be a day old by then."""
    from schemas.codec import encode
    from schemas.events import Impression

    time.sleep(settings.windows.idle_timeout_s + 2)
    now = int(time.time() * 1000) - 60_000
    partitions = sorted(producer.producer.partitions_for(settings.topics.impressions))
    for p in partitions:
        imp = Impression(impression_id=f"{CLOSING}{p}", request_id=f"{CLOSING}{p}", user_id=0, ad_id=0,
                         advertiser_id=0, campaign_id=0, placement="closing", position=0, device="closing", bid=0.0,
                         event_time_ms=now, model_version=FALLBACK_VERSION, served_pctr=0.0, served_pcvr=0.0,
                         feature_ref=f"{CLOSING}{p}")
        key, value, headers = encode(imp)
        producer.send(settings.topics.impressions, key=key, value=value, headers=headers, timestamp_ms=now,
                      partition=p)
    producer.flush()
    return len(partitions)


def restart(server, pause_s: float) -> str:
    """Stop a local server (``infra.kafka_broker.KafkaBroker``, ``infra.redis_server.RedisServer``), wait, start it."""
    t0 = time.monotonic()
    server.stop()
    time.sleep(pause_s)
    server.start()
    return f"down {time.monotonic() - t0:.1f} s"


def restart_broker() -> str:
    from infra.kafka_broker import KafkaBroker

    return restart(KafkaBroker(get_settings()), pause_s=3.0)


def restart_redis() -> str:
    from infra.redis_server import RedisServer

    return restart(RedisServer(get_settings()), pause_s=2.0)


def run(hours: int = 24, impressions_per_hour: float = 200.0, speed: float = 2880.0, seed: int = 7,
        run_id: str | None = None) -> ChaosRun:
    """Two simulated days of ``hours`` each (the last ``hours`` of one UTC day, the first of the next) with the
    faults above; returns what the checks need."""
    assert 8 <= hours <= 24, "a simulated day has 8 to 24 hours"
    from infra.demo import day_batch, settle
    from streams.simulator.closed_loop import ClosedLoop, random_policy, run_hours
    from streams.simulator.config import SimulatorConfig
    from streams.simulator.run import make_producer, send_catalog
    from trainers import full_retrain

    run_id = run_id or f"chaos{int(time.time())}"
    settings = chaos_settings(run_id)
    rng = random.Random(seed)
    out = ChaosRun(settings)
    logs = settings.var_dir / "logs"
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    # Day 0 ends at a UTC midnight and day 1 starts there, two days ago: the data is a day old when it ends.
    start = midnight - timedelta(days=2, hours=hours)
    out.day_ends = [start.date(), midnight.date() - timedelta(days=2)]
    cfg = SimulatorConfig(run_id=run_id, start=start, hours=48.0, users=5_000, ads=1_000, seed=seed,
                          impressions_per_hour=impressions_per_hour, speed=speed, prediction_log=False)
    joiner_group, realtime_group = f"label-joiner-{run_id}", f"realtime-{run_id}"
    joiner = Supervised("label joiner", lambda: start_worker(settings, joiner_group, logs / "joiner.log")).start()
    realtime = Supervised("real-time features", lambda: start_worker(
        settings, realtime_group, logs / "realtime.log", app_module="streams.realtime_app")).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = sys.executable
    scorer = Supervised("scoring service", lambda: launch([py, "-m", "streams.serving", "--port", str(port)],
                                                          settings, logs / "serving.log"))
    trainer = Supervised("online trainer", lambda: launch([py, "-m", "trainers.online", "--publish-every", "5"],
                                                          settings, logs / "online.log"))
    always_on = [joiner, realtime]
    print(f"chaos: run {run_id}, topics {run_id}-*, lake and logs in {settings.var_dir}", flush=True)

    loop = ClosedLoop(cfg, settings, candidates=50)
    producer = AckCounter(make_producer(settings))
    send_catalog(loop.world.campaigns(cfg.start_ms), settings)
    truths = []

    def fault(hour: int, what: str, action: Callable[[], str | None]) -> None:
        detail = action() or ""
        out.faults.append(Fault(hour, what, detail))
        print(f"chaos: hour {hour}: {what} {detail}", flush=True)

    def day0_hour(hour: int, _truth) -> None:
        for proc in always_on:
            proc.ensure()
        if hour == hours // 6:
            fault(hour, "kill -9 label joiner", joiner.kill9)
        elif hour == 2 * hours // 6:
            producer.flush()  # what the simulator sent so far is acknowledged; the pipeline is still working on it
            fault(hour, "restart Kafka broker", restart_broker)
        elif hour == 3 * hours // 6:
            fault(hour, "kill -9 real-time features", realtime.kill9)
        elif hour == 4 * hours // 6:
            fault(hour, "restart Redis", restart_redis)

    mid_hour: list[threading.Timer] = []

    def kill_soon(proc: Supervised, hour: int) -> None:
        """``kill -9`` a moment into the next hour, while the ad server is sending it requests."""
        timer = threading.Timer(rng.uniform(0.05, 0.3), lambda: fault(hour + 1, f"kill -9 {proc.name}",
                                                                       proc.kill9))
        timer.start()
        mid_hour.append(timer)

    def day1_hour(hour: int, _truth) -> None:
        for timer in mid_hour:
            timer.join()
        mid_hour.clear()
        for proc in always_on:
            proc.ensure()
        h = hour - hours
        if scorer in always_on:
            wait_healthy(url)  # the load balancer sends no traffic to a replica that is not ready
        if h == hours // 8:
            kill_soon(scorer, hour)
        elif h == 2 * hours // 8:
            kill_soon(trainer, hour)
        elif h == 3 * hours // 8:
            producer.flush()
            fault(hour, "restart Kafka broker", restart_broker)
        elif h == 4 * hours // 8:
            fault(hour, "restart Redis", restart_redis)
        elif h == 5 * hours // 8:
            kill_soon(joiner, hour)
        elif h == 6 * hours // 8:
            kill_soon(scorer, hour)

    try:
        truths.append(run_hours(loop, range(0, hours), random_policy, producer, speed, on_hour=day0_hour))
        producer.flush()
        settle(settings, joiner_group, realtime_group)
        day0 = out.day_ends[0]
        batch(settings, day0, out, rng, logs)
        version = full_retrain.run(settings, end=day0.isoformat(), days=1)
        print(f"chaos: full retrain {version} promoted", flush=True)

        scorer.start()
        trainer.start()
        always_on += [scorer, trainer]
        wait_healthy(url)
        truths.append(run_hours(loop, range(hours, 2 * hours), http_policy(url, out.fallbacks), producer, speed,
                                on_hour=day1_hour))
        for timer in mid_hour:
            timer.join()
        producer.flush()
        for proc in always_on:
            proc.ensure()
        wait_healthy(url)
        out.service_health = service_health(url)
        settle(settings, joiner_group, realtime_group)
        print(f"chaos: closing traffic sent ({send_closing_traffic(settings, producer)} impressions)", flush=True)
        settle(settings, joiner_group, realtime_group)
    finally:
        for timer in mid_hour:
            timer.cancel()
        producer.close()
        for proc in reversed(always_on):
            proc.stop()
    out.sent, out.failed_sends = producer.acked, producer.failed
    out.truth = pd_concat(truths)
    day_batch(settings, out.day_ends[1], training_set=False, replay=False)
    out.faults += [Fault(-1, f"{p.name} exited (restarted by the supervisor)", str(p.exits))
                   for p in (joiner, realtime, scorer, trainer) if p.exits]
    return out


def batch(settings: Settings, ds: date, out: ChaosRun, rng: random.Random, logs: Path) -> None:
    """Day ``ds``'s batch side (the demo's steps), with its bronze and gold runs first killed with ``kill -9``
    mid-run, then re-run."""
    from infra.demo import day_batch

    markers = {"bronze": "records landed", "gold": "gold: quality of"}  # printed while it lands / writes

    def kill_first(step: str) -> None:
        if step not in markers:
            return
        killed = kill_mid_run([sys.executable, "-m", f"batch_jobs.{step}", "--ds", ds.isoformat()], settings,
                              markers[step], logs / f"{step}-killed.log", rng)
        out.faults.append(Fault(-1, "kill -9 Spark job", str(killed)))
        print(f"chaos: {killed}; re-running", flush=True)

    day_batch(settings, ds, training_set=True, replay=False, before=kill_first)


def service_health(url: str) -> dict:
    import requests

    return requests.get(f"{url}/health", timeout=5.0).json()


def pd_concat(frames):
    import pandas as pd

    return pd.concat([f for f in frames if len(f)], ignore_index=True)


# -- the checks ---------------------------------------------------------------------------------------------------
@dataclass
class Check:
    what: str
    checked: int
    lost: int
    duplicated: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0


def check_landed(spark, run: ChaosRun) -> list[Check]:
    """Every record the broker acknowledged is in bronze once (a row or a dead letter with its reason)."""
    from pyspark.sql import functions as F

    from batch_jobs.bronze import SOURCES, table_path
    from infra.topics import topic_counts

    settings = run.settings
    out = []
    held = topic_counts(settings, [s.topic(settings) for s in SOURCES])
    from delta.tables import DeltaTable

    for source in SOURCES:
        topic = source.topic(settings)
        if held[topic] == 0 and not DeltaTable.isDeltaTable(spark, table_path(settings, source)):
            continue  # nothing was sent on it (a sparse topic), so nothing can be lost
        frame = spark.read.format("delta").load(table_path(settings, source))
        rows = frame.count()
        distinct = frame.select("kafka_partition", "kafka_offset").distinct().count()
        rejected = frame.where(F.col("reject_reason").isNotNull()).count()
        sent = run.sent.get(topic)
        detail = f"{rejected:,} dead letters with their reason"
        if sent is not None:
            refused = {err: n for (t, err), n in run.failed_sends.items() if t == topic}
            detail += (f"; the simulator's producer had {sent:,} acknowledged"
                       + (f", refused by the broker: {refused} (the simulator's oversized records)" if refused else ""))
        out.append(Check(f"bronze {source.table}: topic records landed", held[topic],
                         lost=held[topic] - distinct, duplicated=rows - distinct, detail=detail))
    return out


def matured(settings: Settings):
    import pandas as pd

    from schemas import MaturedLabel, decode

    return pd.DataFrame([decode(MaturedLabel, r.value, r.headers).model_dump()
                         for r in read_topic(settings, settings.topics.matured_labels)])


def uninterrupted_labels(run: ChaosRun):
    """An uninterrupted joiner over the same inputs (a fresh group, its own outputs and state): its labels."""
    from infra.demo import wait_until_caught_up

    settings = run.settings
    t = settings.topics
    clean_topics = t.model_copy(update={n: f"{getattr(t, n)}-clean"
                                        for n in ("training_examples", "matured_labels", "dead_letters")})
    # It reads every input in one go, so its inputs go idle together and its clock would hold where the reading
    # left it: with every input idle it advances from the last data instead (nothing arrives after), and closes
    # every window. The chaos joiner's windows were closed by the closing traffic.
    windows = settings.windows.model_copy(update={"idle_advance_rate": 100_000.0})
    clean = settings.model_copy(update={"topics": clean_topics, "var_dir": settings.var_dir / "clean",
                                        "windows": windows})
    ensure_topics(clean)
    group = f"clean-{settings.feast_project}"
    proc = start_worker(clean, group, clean.var_dir / "joiner.log")
    try:
        wait_until_caught_up(clean, group)
        last, still = -1, 0
        while still < 3:  # its output settles (the last windows hold while every input is idle)
            n = len(read_topic(clean, t.matured_labels + "-clean"))
            still, last = (still + 1, n) if n == last else (0, n)
            time.sleep(2)
    finally:
        stop_worker(proc)
    return matured(clean)


def compare_labels(labels, clean):
    """``labels`` against the uninterrupted run's: (labels by impression, reference by impression, impressions
    repeated in ``labels``, impressions in both, how many of those differ in ``clicked`` or ``converted``). The
    closing traffic is left out of the reference: its windows close only with the next traffic after it."""
    dup = int(labels["impression_id"].duplicated().sum())
    a = labels.drop_duplicates("impression_id").set_index("impression_id")
    u = clean.drop_duplicates("impression_id").set_index("impression_id")
    u = u[~u.index.str.startswith(CLOSING)]
    common = a.index.intersection(u.index)
    differ = int(((a.loc[common, "clicked"] != u.loc[common, "clicked"])
                  | (a.loc[common, "converted"] != u.loc[common, "converted"])).sum())
    return a, u, dup, common, differ


def check_labels(run: ChaosRun, clean) -> list[Check]:
    """The chaos joiner's labels: each impression once, the same impressions as the uninterrupted run, with the
    same labels (the closing traffic closed every window of the data in both)."""
    c, u, dup, common, differ = compare_labels(matured(run.settings), clean)
    return [Check("label joiner: matured labels", len(u), lost=len(u.index.difference(c.index)), duplicated=dup,
                  detail=f"{len(c.index.difference(u.index))} matured only here; {int(u['clicked'].sum()):,} "
                         f"clicked, {int(u['converted'].sum()):,} converted"),
            Check("label joiner: labels equal to an uninterrupted run", len(common), lost=differ, duplicated=0)]


def check_silver(spark, run: ChaosRun, clean) -> Check:
    """Silver (the batch twin over bronze): once per impression, the impressions the stream labeled, the same
    labels."""
    from batch_jobs.silver import silver_path

    s = spark.read.format("delta").load(silver_path(run.settings)).select(
        "impression_id", "clicked", "converted").toPandas()
    s, u, dup, _common, differ = compare_labels(s, clean)
    return Check("silver labeled impressions", len(u), lost=len(u.index.difference(s.index)) + differ,
                 duplicated=dup, detail=f"{differ} labels differ from the stream's; "
                                        f"{len(s.index.difference(u.index))} only in silver")


def check_prediction_log(run: ChaosRun) -> Check:
    """Every impression the scoring service served has its prediction-log record (read once per impression)."""
    from schemas import decode
    from schemas.events import PredictionLog
    from streams.simulator.closed_loop import BASELINE_VERSION

    truth = run.truth
    served = set(truth.loc[~truth["model_version"].isin([BASELINE_VERSION, FALLBACK_VERSION]), "impression_id"])
    logged = Counter(decode(PredictionLog, r.value, r.headers).impression_id
                     for r in read_topic(run.settings, run.settings.topics.prediction_log))
    return Check("prediction log: impressions served by the model", len(served),
                 lost=len(served - set(logged)), duplicated=0,
                 detail=f"{sum(logged.values()) - len(logged):,} repeats (at least once; readers keep one per "
                        f"impression); {run.fallbacks['requests']:,} requests the ad server served without a model "
                        "while the service was down")


def check_online_store(run: ChaosRun) -> Check:
    """The online store equals a fresh materialization of the lake into a new project by Feast's own
    ``feast materialize`` (an independent writer: the run loaded its store with ours), key by key."""
    from feature_repo.cli import feast

    settings = run.settings
    fresh = settings.model_copy(update={"feast_project": settings.feast_project + "fresh"})
    first = run.day_ends[0]
    feast(["apply"], fresh)
    until = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)  # the closing traffic's rows included
    feast(["materialize", (datetime.combine(first, datetime.min.time()) - timedelta(days=1)).isoformat(),
           until.isoformat(timespec="seconds")], fresh)
    client = settings.redis.client()
    mine, theirs = settings.feast_project.encode(), fresh.feast_project.encode()
    keys = [k for k in client.scan_iter(match=b"*" + mine, count=1000) if not k.endswith(theirs)]
    fresh_keys = {k[: -len(theirs)] for k in client.scan_iter(match=b"*" + theirs, count=1000)}
    differ = 0
    for k in keys:
        if feast_fields(client.hgetall(k)) != feast_fields(client.hgetall(k[: -len(mine)] + theirs)):
            differ += 1
    have = {k[: -len(mine)] for k in keys}
    return Check("online store vs a fresh materialization", len(fresh_keys), lost=len(fresh_keys - have) + differ,
                 duplicated=0, detail=f"{differ} of {len(keys):,} entity rows differ; {len(have - fresh_keys)} only "
                                      "in the online store")


def feast_fields(row: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The fields Feast writes and reads (features and ``_ts:<view>``); the real-time worker's own ``_tsms:`` and
    ``_v:`` fields (feature_repo.online) are not materialized."""
    return {k: v for k, v in row.items() if not k.startswith((b"_tsms:", b"_v:"))}


def check_registry(run: ChaosRun) -> Check:
    """The promoted model verifies, loads with finite weights, was never rolled back, and is what serving had."""
    import torch

    from trainers.registry import CorruptModel, Registry
    from trainers.scoring import load

    registry = Registry(run.settings.registry_dir)
    versions = [m["version"] for m in registry.list()]
    corrupt = 0
    for v in versions:
        try:
            registry.verify(v)
        except CorruptModel:
            corrupt += 1
    promoted = registry.promoted()
    model = load(registry)
    finite = all(bool(torch.isfinite(p).all()) for p in model.model.parameters())
    bad = int(not finite) + int(promoted in registry.rolled_back())
    served = run.service_health.get("model_version")
    return Check("model registry", len(versions), lost=corrupt + bad, duplicated=0,
                 detail=f"promoted {promoted} (finite weights: {finite}); the service served {served}")


def check_all(run: ChaosRun) -> list[Check]:
    from infra.spark_session import spark_session

    spark = spark_session("chaos-check", run.settings)
    clean = uninterrupted_labels(run)
    return [*check_landed(spark, run), *check_labels(run, clean), check_silver(spark, run, clean),
            check_prediction_log(run), check_online_store(run), check_registry(run)]


def table(run: ChaosRun, checks: list[Check]) -> str:
    lines = ["", "Faults injected:", f"  {'hour':>4}  {'fault':<44} detail"]
    lines += [f"  {f.hour if f.hour >= 0 else '-':>4}  {f.what:<44} {f.detail}" for f in run.faults]
    lines += ["", f"  {'check':<52} {'checked':>9} {'lost':>6} {'twice':>6}  detail"]
    lines += [f"  {c.what:<52} {c.checked:>9,} {c.lost:>6,} {c.duplicated:>6,}  {c.detail}" for c in checks]
    lost = sum(c.lost for c in checks)
    twice = sum(c.duplicated for c in checks)
    lines += ["", f"chaos: {len(run.faults)} faults injected, {sum(c.checked for c in checks):,} records checked, "
                  f"{lost} lost, {twice} counted twice (goal: 0 and 0)"]
    return "\n".join(lines)


def write_report(run: ChaosRun, checks: list[Check]) -> Path:
    """The table, printed and kept beside the run's logs."""
    text = table(run, checks)
    print(text, flush=True)
    path = run.settings.var_dir / "chaos_report.txt"
    path.write_text(text + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--day-hours", type=int, default=24, help="simulated hours per day (two days)")
    p.add_argument("--impressions-per-hour", type=float, default=600.0)
    p.add_argument("--speed", type=float, default=1440.0, help="simulated seconds per wall-clock second")
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    done = run(a.day_hours, a.impressions_per_hour, a.speed, a.seed)
    checks = check_all(done)
    print(f"chaos: report in {write_report(done, checks)}", flush=True)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
