"""Bronze lands every Kafka record exactly once, by the offsets it keeps with the data: re-runs, new data
and runs killed at random moments neither lose nor duplicate a record; bad records become dead letters."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

from batch_jobs import bronze
from infra.settings import ROOT
from infra.spark_session import spark_session
from infra.topics import read_topic, topic_counts
from schemas.codec import InvalidEvent
from schemas.fast import FastDecoder
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate, send, send_catalog

CFG = SimulatorConfig(hours=1, users=2_000, ads=500, impressions_per_hour=3_000, speed=0, seed=41,
                      malformed_share=0.02)


def landed(settings) -> dict[str, tuple[int, int, int]]:
    """Per table: (rows, distinct (partition, offset), rejects)."""
    spark = spark_session("test", settings)
    out = {}
    for source in bronze.SOURCES:
        frame = spark.read.format("delta").load(bronze.table_path(settings, source))
        out[source.table] = (frame.count(), frame.select("kafka_partition", "kafka_offset").distinct().count(),
                             frame.where("reject_reason IS NOT NULL").count())
    return out


def rejected_by_stream(settings, source: bronze.Source) -> set[tuple[int, int]]:
    decoder, out = FastDecoder(source.model), set()
    for r in read_topic(settings, source.topic(settings)):
        try:
            decoder.decode(r.value, r.headers)
        except InvalidEvent:
            out.add((r.partition, r.offset))
    return out


def rejected_by_bronze(settings, source: bronze.Source) -> set[tuple[int, int]]:
    frame = spark_session("test", settings).read.format("delta").load(bronze.table_path(settings, source))
    return {(r[0], r[1]) for r in frame.where("reject_reason IS NOT NULL")
            .select("kafka_partition", "kafka_offset").collect()}


def in_topics(settings) -> dict[str, int]:
    counts = topic_counts(settings, [s.topic(settings) for s in bronze.SOURCES])
    return {s.table: counts[s.topic(settings)] for s in bronze.SOURCES}


def publish(settings, cfg: SimulatorConfig):
    gen = generate(cfg, settings, drain=True)
    send_catalog(gen.campaigns, settings)
    send(gen.schedule, settings, speed=0, start_ms=cfg.start_ms)
    return gen


def test_bronze_lands_each_record_once_and_keeps_bad_ones_as_dead_letters(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    gen = publish(settings, CFG)
    bronze.run(None, settings)
    want = in_topics(settings)
    got = landed(settings)
    assert {t: rows for t, (rows, _, _) in got.items()} == want
    assert all(rows == distinct for rows, distinct, _ in got.values())
    assert gen.truth["impression_malformed"].sum() > 0
    for source in bronze.SOURCES:  # the same records are rejected as by the stream's decoder
        assert rejected_by_bronze(settings, source) == rejected_by_stream(settings, source), source.table
    dead = bronze.dead_letters(spark_session("test", settings), settings).toPandas()
    assert len(dead) == sum(r for _, _, r in got.values())
    assert dead["reject_reason"].str.len().min() > 0 and dead["payload"].notna().all()

    bronze.run(None, settings, quality=False)  # nothing new: nothing landed twice
    assert landed(settings) == got

    publish(settings, CFG.model_copy(update={"seed": 42, "run_id": "second"}))
    bronze.run(None, settings, quality=False)  # only the new records
    again = landed(settings)
    assert {t: rows for t, (rows, _, _) in again.items()} == in_topics(settings)
    assert all(rows == distinct for rows, distinct, _ in again.values())


def test_killed_bronze_runs_lose_and_duplicate_nothing(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    publish(settings, CFG)
    env = {**os.environ, **settings.to_env()}
    cmd = [sys.executable, "-m", "batch_jobs.bronze", "--ds", datetime.now(UTC).date().isoformat()]
    rng = random.Random(5)
    for _ in range(2):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(8, 25))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    got = landed(settings)
    assert {t: rows for t, (rows, _, _) in got.items()} == in_topics(settings)
    assert all(rows == distinct for rows, distinct, _ in got.values())
