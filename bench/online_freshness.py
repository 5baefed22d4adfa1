"""Online-model freshness: from a training example's arrival in Kafka to a published model that learned it.

``python -m bench.online_freshness [--rates 6,200,2000] [--seconds 60] [--publish-every 10]``

For each rate: a fresh topic set, the online trainer (``python -m trainers.online --no-features``: ids and
context only, as no serving runs here to log features) started as its own process off a promoted batch root (an
untrained ranker at the stream's click rate, registered as a full retrain of two days ago: in production the line
always starts off one), then training examples produced at that rate for ``--seconds``. The default promotion gate
applies: a version is promoted once the line's progressive log loss over at least ``online_gate_min_examples``
examples is no worse than the root's. Each
example's freshness is the creation time of the first published version whose stored offsets cover it, minus
the example's Kafka timestamp: measured from the data (the topic and the registry), not reported by the
trainer. 6 examples/s is the simulator's live rate (20k impressions an hour); the others are stress rates.
The peer is Monolith's published cadence: sparse parameters synced in minutes, dense ones daily.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from infra.settings import get_settings
from infra.topics import read_topic, with_topic_prefix
from label_joiner.schemes import example
from schemas.codec import encode
from schemas.events import TrainingExample
from trainers.data import InputSpec
from trainers.model import Ranker
from trainers.registry import Registry
from trainers.scoring import ScoringModel, save


def make_example(i: int, now_ms: int) -> TrainingExample:
    clicked = i % 20 == 0
    base = {"impression_id": f"b{i}", "user_id": i % 5000, "ad_id": i % 800, "advertiser_id": i % 40,
            "campaign_id": i % 160, "placement": "feed", "position": i % 4, "device": "ios", "model_version": "m0",
            "impression_time_ms": now_ms - 30_000, "click_time_ms": now_ms - 27_000, "conversion_time_ms": None}
    kind = f"click/c{i}" if clicked else "noclick"
    return TrainingExample(**example(base, "fnw", kind, clicked=clicked, converted=False, label_ctcvr=0.0,
                                     as_of_ms=now_ms))


def register_root(settings) -> str:
    """Promote an untrained ranker, its CTR logit at the examples' 5 % click rate, as the batch root the online
    line starts off (its data range ends before the examples' impressions, so none is skipped)."""
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    model = Ranker.from_settings(spec, settings.trainer)
    model.shift_ctr_logit(math.log(0.05 / 0.95))
    registry = Registry(settings.registry_dir)
    day = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    version = save(registry, ScoringModel(model), "full",
                   {"data_range": [day], "parent": None,
                    "feature_service": {"name": "ranker", "spec": spec.fingerprint()}})
    registry.promote(version, reason="bench: the batch root of the online line")
    return version


def one_rate(rate: float, seconds: float, publish_every: float) -> dict:
    from kafka import KafkaProducer

    var = Path(tempfile.mkdtemp(prefix="bench-online-"))
    settings = with_topic_prefix(get_settings(), f"bof{int(time.time())}r{int(rate)}").model_copy(
        update={"var_dir": var})
    register_root(settings)
    env = {**os.environ, **settings.to_env()}
    log = open(var / "trainer.log", "w")  # noqa: SIM115 - closed below
    trainer = subprocess.Popen([sys.executable, "-m", "trainers.online", "--publish-every", str(publish_every),
                                "--idle-exit", str(publish_every + 15), "--no-features"],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(12)  # the trainer imports torch and opens its consumer
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=5)
    sent, began = 0, time.monotonic()
    while time.monotonic() - began < seconds:
        due = int((time.monotonic() - began) * rate)
        for i in range(sent, due):
            key, value, headers = encode(make_example(i, int(time.time() * 1000)))
            producer.send(settings.topics.training_examples, key=key, value=value, headers=headers)
        sent = max(sent, due)
        producer.flush()
        time.sleep(0.05)
    producer.close()
    trainer.wait(timeout=seconds + 300)
    log.close()
    records = read_topic(settings, settings.topics.training_examples)
    versions = sorted((m for m in Registry(settings.registry_dir).list() if m.get("cadence") == "online"),
                      key=lambda m: m["created_ms"])
    lags = []
    for r in records:
        covering = [m for m in versions if m["kafka_offsets"].get(str(r.partition), 0) > r.offset]
        if covering:
            lags.append((r.timestamp, (covering[0]["created_ms"] - r.timestamp) / 1000.0))
    lags_a = np.array([lag for _, lag in lags] or [np.nan])
    # Steady state: examples that arrived after the line's first promotion (the gate had filled once).
    first = versions[0]["created_ms"] if versions else None
    steady = np.array([lag for at, lag in lags if first and at > first] or [np.nan])
    return {"rate": rate, "examples": len(records), "learned": len(lags), "versions": len(versions),
            "p50": float(np.percentile(lags_a, 50)), "p99": float(np.percentile(lags_a, 99)),
            "max": float(np.max(lags_a)), "steady_p99": float(np.percentile(steady, 99)),
            "first_s": (first - records[0].timestamp) / 1000.0 if first and records else float("nan"),
            "log": str(var / "trainer.log")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.online_freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="6,200,2000", help="examples/s, comma separated")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--publish-every", type=float, default=10.0)
    a = p.parse_args(argv)
    rows = []
    for rate in (float(r) for r in a.rates.split(",")):
        print(f"online freshness: {rate:g} examples/s for {a.seconds:g} s ...", flush=True)
        rows.append(one_rate(rate, a.seconds, a.publish_every))
    print(f"\npublish every {a.publish_every:g} s; dense and sparse parameters published together\n")
    print("| examples/s | examples | learned | versions | p50 s | p99 s | max s | first promotion s | "
          "p99 s after it |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:g} | {r['examples']:,} | {r['learned']:,} | {r['versions']} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['max']:.1f} | {r['first_s']:.1f} | {r['steady_p99']:.1f} |")
    print("\npeer (published): Monolith syncs sparse parameters every few minutes, dense parameters daily")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
