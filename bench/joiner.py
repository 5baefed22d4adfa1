"""Label joiner throughput and latency versus a Spark Structured Streaming stream-stream join and a bare
aiokafka consume loop, on the same topics and events in one run.

``python -m bench.joiner --hours 6`` prints a table (``--paths ours --no-latency`` for one quick number).

* throughput: every input event is already in Kafka (a backlog). Ours: events/s from the worker's first
  committed input offset until it has committed every input event (a commit follows the flush of the
  outputs and the state of the events before it; worker start-up excluded). Spark: from the query's
  start (session up) until the joined clicks are in Kafka (it takes the backlog in one micro-batch).
  Bare aiokafka: a consume loop that only counts records. Bare faust (``bench/faust_ceiling.py``): a faust
  agent with the joiner's settings and batches that does nothing, measured like ours.
* latency: the simulator sends live at ``--live-rate`` events/s while the join runs; for every click the
  time from the arrival in Kafka (log timestamp) of the event that completes its join (the later of the
  click and its impression) to its joined record in Kafka (ditto).
The Spark peer joins impressions with clicks (30 s window, watermarks) and writes to Kafka; it is the
join a user would otherwise pick. It does the click join only (no conversions, no dedup state), so it
does less work per event than ours.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from infra.settings import Settings, get_settings
from infra.topics import group_lag, read_topic, topic_counts, with_topic_prefix
from label_joiner.worker import start_worker, stop_worker
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate, send


def fresh(tag: str) -> Settings:
    return with_topic_prefix(get_settings(), f"bench-{tag}-{uuid.uuid4().hex[:6]}")


def load(settings: Settings, cfg: SimulatorConfig) -> int:
    counts = send(generate(cfg, settings, drain=True).schedule, settings, speed=0, start_ms=cfg.start_ms,
                  log_every_s=1e9)
    return sum(v for k, v in counts.items() if k != settings.topics.prediction_log)


# -- bare aiokafka ------------------------------------------------------------------------------------
def bare_consume(settings: Settings, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    async def run() -> float:
        t = settings.topics
        consumer = AIOKafkaConsumer(t.impressions, t.clicks, t.conversions,
                                    bootstrap_servers=settings.kafka.bootstrap_servers,
                                    auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
        await consumer.start()
        seen, t0 = 0, time.perf_counter()
        try:
            while seen < n:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                seen += sum(len(b) for b in batches.values())
        finally:
            await consumer.stop()
        return n / (time.perf_counter() - t0)

    return asyncio.run(run())


# -- our joiner ---------------------------------------------------------------------------------------
def committed_throughput(settings: Settings, n: int, log: Path, workers: int = 1,
                   app_module: str = "label_joiner.app") -> float:
    """From the workers' first committed input offset until they have committed every input event (each
    commit follows the flush of the outputs and state of the events before it). ``app_module``
    ``bench.faust_ceiling`` measures a faust agent that does nothing, the same way."""
    app_id = f"bench-{uuid.uuid4().hex[:6]}"
    procs = [start_worker(settings, app_id, log.with_suffix(f".{i}.log"), app_module=app_module)
             for i in range(workers)]
    t = settings.topics
    try:
        t0 = None
        while True:
            done, total = group_lag(settings, app_id, [t.impressions, t.clicks, t.conversions])
            if done and t0 is None:
                t0, done0 = time.perf_counter(), done
            if total and done >= total:
                return (n - done0) / (time.perf_counter() - t0)
            time.sleep(0.1)
    finally:
        for proc in procs:
            stop_worker(proc)


def click_latencies(settings: Settings, output_topic: str, click_key) -> np.ndarray:
    """ms from the arrival of the event that completes each click's join to its joined record, by log time.

    That event is the later of the click and its impression: a click delivered before its impression
    (out of order) can only be joined once the impression is in Kafka, by either joiner."""
    arrived = {r.key: r.timestamp for r in read_topic(settings, settings.topics.impressions)}
    clicked = set()
    for r in read_topic(settings, settings.topics.clicks):
        clicked.add(r.key)
        arrived[r.key] = max(arrived.get(r.key, 0), r.timestamp)
    lat = [r.timestamp - arrived[k] for r in read_topic(settings, output_topic)
           if (k := click_key(r)) in clicked]
    return np.asarray(lat, dtype=float)


def live_send(settings: Settings, cfg: SimulatorConfig, rate: float) -> None:
    """Send the run paced so that about ``rate`` events/s reach Kafka."""
    gen = generate(cfg, settings)
    span_s = (cfg.end_ms - cfg.start_ms) / 1000
    send(gen.schedule, settings, speed=span_s * rate / max(len(gen.schedule), 1), start_ms=cfg.start_ms,
         log_every_s=1e9)


def our_latency(settings: Settings, cfg: SimulatorConfig, rate: float, log: Path) -> np.ndarray:
    import orjson

    worker = start_worker(settings, f"bench-{uuid.uuid4().hex[:6]}", log)
    try:
        time.sleep(8)  # joined the group
        live_send(settings, cfg, rate)
        time.sleep(5)
    finally:
        stop_worker(worker)

    def key(r):
        ex = orjson.loads(r.value)
        return ex["impression_id"].encode() if ex["clicked"] and not ex["converted"] else None

    return click_latencies(settings, settings.topics.training_examples, key)


# -- Spark Structured Streaming -----------------------------------------------------------------------
def spark_join(settings: Settings, checkpoint: Path, stop_when, trigger_s: float = 0.5, started=None):
    """Impressions joined with clicks within the click window, with watermarks, written to Kafka."""
    from pyspark.sql import functions as F

    from infra.spark_session import spark_session
    from schemas.events import Click, Impression
    from schemas.spark import spark_schema

    spark = spark_session("bench-join", settings)
    t = settings.topics

    def stream(topic, cls, prefix):
        df = (spark.readStream.format("kafka").option("kafka.bootstrap.servers", settings.kafka.bootstrap_servers)
              .option("subscribe", topic).option("startingOffsets", "earliest").load())
        e = df.select(F.from_json(F.col("value").cast("string"), spark_schema(cls)).alias("e")).select("e.*")
        return (e.withColumn(f"{prefix}_ts", F.timestamp_millis("event_time_ms"))
                .withWatermark(f"{prefix}_ts", f"{int(settings.windows.allowed_lateness_s)} seconds"))

    imps = stream(t.impressions, Impression, "imp").dropDuplicates(["impression_id", "imp_ts"])
    clicks = stream(t.clicks, Click, "click").select(F.col("impression_id").alias("cid"), "click_ts")
    joined = imps.join(clicks, F.expr(
        f"impression_id = cid AND click_ts >= imp_ts AND click_ts <= imp_ts + interval "
        f"{int(settings.windows.click_window_s)} seconds"))
    out = joined.select(F.col("impression_id").cast("binary").alias("key"),
                        F.to_json(F.struct("impression_id", "click_ts")).alias("value"))
    query = (out.writeStream.format("kafka").option("kafka.bootstrap.servers", settings.kafka.bootstrap_servers)
             .option("topic", t.training_examples).option("checkpointLocation", str(checkpoint))
             .trigger(processingTime=f"{trigger_s} seconds").start())
    if started is not None:
        started.append(time.perf_counter())
    try:
        while not stop_when():
            time.sleep(0.5)
    finally:
        query.stop()


def spark_throughput(settings: Settings, n: int, clicks: int, tmp: Path) -> float:
    """From the query's start (the session is up) until the joined clicks are in Kafka: Spark takes the
    whole backlog in its first micro-batch, so its first output is also nearly its last."""
    started: list[float] = []
    t0 = time.perf_counter()

    def done() -> bool:
        c = topic_counts(settings, [settings.topics.training_examples])[settings.topics.training_examples]
        return c >= 0.97 * clicks or time.perf_counter() - t0 > 600

    spark_join(settings, tmp / f"ckpt-{uuid.uuid4().hex[:6]}", done, started=started)
    return n / (time.perf_counter() - started[0])


def spark_latency(settings: Settings, cfg: SimulatorConfig, rate: float, tmp: Path) -> np.ndarray:
    finished = threading.Event()

    def producer():
        time.sleep(25)  # the query is up
        live_send(settings, cfg, rate)
        time.sleep(10)
        finished.set()

    threading.Thread(target=producer, daemon=True).start()
    spark_join(settings, tmp / f"ckpt-{uuid.uuid4().hex[:6]}", finished.is_set)
    return click_latencies(settings, settings.topics.training_examples, lambda r: r.key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--live-hours", type=float, default=1.0)
    p.add_argument("--live-rate", type=float, default=500.0, help="events/s for the latency runs")
    p.add_argument("--paths", default="bare,faust,ours,spark", help="comma-separated subset of bare,faust,ours,spark")
    p.add_argument("--workers", type=int, default=1, help="faust workers (processes) for the throughput run")
    p.add_argument("--no-latency", action="store_true", help="throughput only")
    a = p.parse_args()
    paths = set(a.paths.split(","))
    tmp = get_settings().var_dir / "bench"
    cfg = SimulatorConfig(hours=a.hours, impressions_per_hour=20_000, speed=0, prediction_log=False, seed=41)
    live = cfg.model_copy(update={"hours": a.live_hours, "seed": 42})
    truth = generate(cfg, get_settings(), drain=True).truth
    rows = []

    if "bare" in paths:
        s = fresh("bare")
        n = load(s, cfg)
        rows.append(("bare aiokafka consume (ceiling)", bare_consume(s, n), None))
        print(rows[-1], flush=True)

    if "faust" in paths:
        s = fresh("faust")
        n = load(s, cfg)
        rows.append(("bare faust agent (faust's ceiling)", committed_throughput(s, n, tmp / "faust.log",
                                                                         app_module="bench.faust_ceiling"), None))
        print(rows[-1][:2], flush=True)

    if "ours" in paths:
        s = fresh("ours")
        n = load(s, cfg)
        thr = committed_throughput(s, n, tmp / "ours.log", workers=a.workers)
        lat = None if a.no_latency else our_latency(fresh("ours-live"), live, a.live_rate, tmp / "ours-live.log")
        rows.append(("label joiner (faust worker)", thr, lat))
        print(rows[-1][:2], flush=True)

    if "spark" in paths:
        s = fresh("spark")
        n = load(s, cfg)
        thr = spark_throughput(s, n, int(truth["clicked"].sum()), tmp)
        lat = None if a.no_latency else spark_latency(fresh("spark-live"), live, a.live_rate, tmp)
        rows.append(("Spark Structured Streaming join", thr, lat))

    print(f"\n{'path':<34} {'events/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'clicks timed':>13}")
    for name, rate, lat in rows:
        if lat is None or len(lat) == 0:
            print(f"{name:<34} {rate:>10,.0f} {'-':>9} {'-':>9} {'-':>13}")
        else:
            print(f"{name:<34} {rate:>10,.0f} {np.percentile(lat, 50):>9.0f} {np.percentile(lat, 99):>9.0f} "
                  f"{len(lat):>13,}")


if __name__ == "__main__":
    main()
