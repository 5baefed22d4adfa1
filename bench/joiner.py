"""Label joiner throughput and latency versus Apache Flink's SQL interval join, a Spark Structured
Streaming stream-stream join and a bare aiokafka consume loop, on the same topics and events in one run.

``python -m bench.joiner --hours 6`` prints a table (``--paths ours --no-latency`` for one quick number).

* throughput: every input event is already in Kafka (a backlog). Ours (1 and 2 worker processes):
  events/s from the group's first committed input offset until it has committed every input event (each
  commit is the transaction holding the outputs and state changes of the events before it; worker
  start-up excluded). Spark: from the query's start (session up) until the joined clicks are in Kafka (it
  takes the backlog in one micro-batch). Flink: a bounded SQL job (``bench/flink_join.py``) from submit to
  end, start-up included. Bare aiokafka: a consume loop that only counts records. Join only: the same events
  through the joiner's processor and RocksDB state in this process, no Kafka (the ceiling of one process).
* latency: the simulator sends a live minute at ``--live-rate`` events/s (event times now, record times
  the send times) while the join runs; for every click the time from the arrival in Kafka (record
  timestamp) of the event that completes its join (the later of the click and its impression) to its
  joined record in Kafka (ditto).
Spark and Flink join impressions with clicks only (30 s window, watermarks, no conversions, no dedup
state): less work per event than ours, which also joins conversions, dedups and dead-letters.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from datetime import timedelta
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
        consumer = AIOKafkaConsumer(t.impressions, t.clicks, t.conversions, t.negative_feedback,
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
def join_only(settings: Settings, cfg: SimulatorConfig, batch: int = 20_000) -> float:
    """The joiner's own work without Kafka: the same events as records of one partition, in delivery order,
    through ``JoinProcessor`` on a RocksDB store (decode, join, state encoded and written per batch, outputs
    encoded), the garbage collector tuned as the worker tunes it; events/s on one core. A ceiling for one
    process: the consumer's fetch, the producer's batches and the broker are not in it."""
    import gc
    import tempfile

    from aiokafka.structs import ConsumerRecord

    from label_joiner.processor import JoinProcessor
    from label_joiner.schemes import make_scheme
    from streams.engine import Outbox
    from streams.service import tune_gc
    from streams.simulator.delivery import iter_messages
    from streams.state import RocksStore

    t = settings.topics
    inputs = {t.impressions, t.clicks, t.conversions, t.negative_feedback}
    records = [ConsumerRecord(topic, 0, i, when, 0, key, value, None, len(key), len(value), headers)
               for i, (topic, key, value, headers, when) in enumerate(iter_messages(generate(cfg, settings,
                                                                                             drain=True).schedule))
               if topic in inputs]
    with tempfile.TemporaryDirectory() as d:
        store = RocksStore(Path(d))
        processor = JoinProcessor(settings, make_scheme("naive"), 0, store)
        old = tune_gc()
        t0 = time.perf_counter()
        for lo in range(0, len(records), batch):
            out = Outbox()
            processor.process(records[lo:lo + batch], out)
            processor.advance(set(), 0, out)
            store.changes()  # encoded as the engine encodes its changelog records; commit stores those bytes
            store.commit(lo)
        seconds = time.perf_counter() - t0
        gc.set_threshold(*old)
        gc.unfreeze()
        store.close()
    return len(records) / seconds


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
            done, total = group_lag(settings, app_id, [t.impressions, t.clicks, t.conversions, t.negative_feedback])
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


def live_config(rate: float, seconds: float, seed: int = 42) -> SimulatorConfig:
    """A live run starting a few seconds from now, about ``rate`` events/s (impressions ~96 % of events)."""
    from datetime import UTC, datetime, timedelta

    return SimulatorConfig(hours=seconds / 3600, impressions_per_hour=rate * 3600 * 0.96, speed=1.0,
                           prediction_log=False, seed=seed, users=50_000, ads=10_000,
                           start=datetime.now(UTC) + timedelta(seconds=15))


def live_send(settings: Settings, cfg: SimulatorConfig, rate: float) -> None:
    """Send the run in real time: each record leaves when the simulated world says it is delivered."""
    gen = generate(cfg, settings)
    time.sleep(max(0.0, cfg.start_ms / 1000 - time.time()))
    send(gen.schedule, settings, speed=1.0, start_ms=cfg.start_ms, log_every_s=1e9)


def our_latency(settings: Settings, cfg: SimulatorConfig, rate: float, log: Path) -> np.ndarray:
    import orjson

    worker = start_worker(settings, f"bench-{uuid.uuid4().hex[:6]}", log)
    try:
        live_send(settings, cfg, rate)  # starts ~15 s from the config's creation: the worker is up by then
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
        live_send(settings, cfg.model_copy(update={"start": cfg.start + timedelta(seconds=30)}), rate)
        time.sleep(10)
        finished.set()

    threading.Thread(target=producer, daemon=True).start()
    spark_join(settings, tmp / f"ckpt-{uuid.uuid4().hex[:6]}", finished.is_set)
    return click_latencies(settings, settings.topics.training_examples, lambda r: r.key)


def flink_throughput(settings: Settings, n: int) -> float | None:
    """Flink's SQL interval join over the same backlog (None when ``make flink`` has not installed it)."""
    from bench.flink_row import flink_available, flink_join

    if not flink_available():
        print("flink: not installed (make flink); row skipped", flush=True)
        return None
    t = settings.topics
    result = flink_join(settings.kafka.bootstrap_servers, t.impressions, t.clicks, t.training_examples)
    counts = topic_counts(settings, [t.impressions, t.clicks])
    return sum(counts.values()) / result["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hours", type=float, default=6.0)
    p.add_argument("--live-seconds", type=float, default=60.0)
    p.add_argument("--live-rate", type=float, default=500.0, help="events/s for the latency runs")
    p.add_argument("--paths", default="bare,join,ours,ours2,spark,flink",
                   help="comma-separated subset of bare,join,ours,ours2,spark,flink")
    p.add_argument("--no-latency", action="store_true", help="throughput only")
    a = p.parse_args()
    paths = set(a.paths.split(","))
    tmp = get_settings().var_dir / "bench"
    cfg = SimulatorConfig(hours=a.hours, impressions_per_hour=20_000, speed=0, prediction_log=False, seed=41)
    truth = generate(cfg, get_settings(), drain=True).truth
    rows: dict[str, tuple[float | None, np.ndarray | None]] = {}

    def add(name: str, rate: float | None, lat: np.ndarray | None = None) -> None:
        rows[name] = (rate, lat)
        print(f"{name}: {rate and round(rate):,} events/s", flush=True)

    if "bare" in paths:
        s = fresh("bare")
        add("bare aiokafka consume (ceiling)", bare_consume(s, load(s, cfg)))
    if "join" in paths:
        add("join only, no Kafka (ceiling of ours)", join_only(get_settings(), cfg))
    if "ours" in paths:
        s = fresh("ours")
        thr = committed_throughput(s, load(s, cfg), tmp / "ours.log", workers=1)
        lat = None if a.no_latency else our_latency(fresh("ours-live"), live_config(a.live_rate, a.live_seconds),
                                                    a.live_rate, tmp / "ours-live.log")
        add("label joiner, 1 process", thr, lat)
    if "ours2" in paths:
        s = fresh("ours2")
        add("label joiner, 2 processes", committed_throughput(s, load(s, cfg), tmp / "ours2.log", workers=2))
    if "spark" in paths:
        s = fresh("spark")
        thr = spark_throughput(s, load(s, cfg), int(truth["clicked"].sum()), tmp)
        lat = None if a.no_latency else spark_latency(fresh("spark-live"), live_config(a.live_rate, a.live_seconds),
                                                      a.live_rate, tmp)
        add("Spark Structured Streaming join", thr, lat)
    if "flink" in paths:
        s = fresh("flink")
        add("Flink SQL interval join (frontier)", flink_throughput(s, load(s, cfg)))

    spark = rows.get("Spark Structured Streaming join", (None,))[0]
    bare = rows.get("bare aiokafka consume (ceiling)", (None,))[0]
    flink = rows.get("Flink SQL interval join (frontier)", (None,))[0]
    print(f"\n{'path':<38} {'events/s':>10} {'x Spark':>8} {'x ceiling':>10} {'x Flink':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'clicks timed':>13}")
    for name, (rate, lat) in rows.items():
        if rate is None:
            continue
        ratios = [f"{rate / ref:>{w}.2f}" if ref else f"{'-':>{w}}" for ref, w in ((spark, 8), (bare, 10), (flink, 8))]
        timed = (f"{np.percentile(lat, 50):>8.0f} {np.percentile(lat, 99):>8.0f} {len(lat):>13,}"
                 if lat is not None and len(lat) else f"{'-':>8} {'-':>8} {'-':>13}")
        print(f"{name:<38} {rate:>10,.0f} {' '.join(ratios)} {timed}")


if __name__ == "__main__":
    main()
