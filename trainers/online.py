"""Streaming online updates: the ranker learns from the joiner's training examples as they arrive.

    python -m trainers.online [--scheme fnw] [--publish-every 10] [--max-seconds N]

Input: ``training_examples`` (every partition, ``read_committed``), read in fetched batches. Per batch:

1. **drop repeats** by ``example_id``: the first position (partition, offset) of each id is kept on disk; an id
   met again at another position is a repeat (a replay of the joiner), the same position is a re-read after a
   restart and is learned again, because the model it was learned into was never published;
2. **delay correction** as configured: FNW weights (``trainers/loss.py``; FNW's duplicated conversion rows do not
   count their click twice), delay-curve soft labels, and corrections that *supersede*: the earlier example of
   the impression is learned once more with the negated weight (its gradient is taken back) and the new one
   learned;
3. features from the online store (the serving read path) for the examples' user and ad;
4. mini-batch updates (Adam), with progressive validation: each batch is scored before it is learned, and the
   CTR log loss feeds ADWIN drift detection (``trainers/river_baseline.LossDriftMonitor``).

Every ``publish_every_s`` a new version is registered (``cadence=online``) with the **input offsets it has
learned up to** in its metadata, and promoted. A restart loads the newest online version (or, the first time,
the promoted batch model) and seeks to its offsets: nothing is skipped and nothing is learned twice into one
model. The per-impression state (first positions, last labels) is kept by position, so a re-read after a
restart sees the state as it was at that position.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.settings import Settings, get_settings
from schemas.events import TrainingExample
from trainers.data import Batch, InputSpec, encode
from trainers.model import Ranker, pick_device
from trainers.registry import Registry
from trainers.river_baseline import LossDriftMonitor
from trainers.scoring import ScoringModel, load, save
from trainers.train import optimizers, step

Position = tuple[int, int]  # (partition, offset)


class ExampleState:
    """Per example id its first position, and per impression the labels learned so far, by position.

    Backed by a dict (tests) or a RocksDB folder (the worker), keys ``e:<example_id>`` and ``i:<impression>``."""

    def __init__(self, path: Path | None = None):
        if path is None:
            self.db: dict = {}
        else:
            from rocksdict import Rdict

            path.mkdir(parents=True, exist_ok=True)
            self.db = Rdict(str(path))

    def first_seen(self, example_id: str, pos: Position) -> bool:
        """True when this position is the example's first (or the same record read again after a restart)."""
        key = f"e:{example_id}"
        first = self.db.get(key)
        if first is None:
            self.db[key] = json.dumps(pos)
            return True
        return tuple(json.loads(first)) == pos

    def previous(self, impression_id: str, pos: Position) -> dict | None:
        """The labels learned for the impression before ``pos`` (entries at or after it are forgotten)."""
        raw = self.db.get(f"i:{impression_id}")
        history = [h for h in json.loads(raw) if tuple(h["pos"]) < pos] if raw else []
        return history[-1] if history else None

    def record(self, impression_id: str, pos: Position, labels: dict) -> None:
        key = f"i:{impression_id}"
        raw = self.db.get(key)
        history = [h for h in json.loads(raw) if tuple(h["pos"]) < pos] if raw else []
        history.append({"pos": list(pos), **labels})
        self.db[key] = json.dumps(history[-4:])

    def close(self) -> None:
        if not isinstance(self.db, dict):
            self.db.close()


def _labels(ex: TrainingExample) -> dict:
    return {"label_ctr": float(ex.label_ctr), "label_ctcvr": float(ex.label_ctcvr), "clicked": ex.clicked,
            "weight": float(ex.weight), "ctr_weight": 1.0}


@dataclass
class Rows:
    """Training rows of one input batch, before features: one dict per row (learned in order)."""

    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def to_rows(examples: list[tuple[Position, TrainingExample]], state: ExampleState, scheme: str) -> Rows:
    """Apply repeat dropping and the delay-correction scheme to examples in arrival order."""
    out = Rows()
    for pos, ex in examples:
        if not state.first_seen(ex.example_id, pos):
            out.counts["repeats"] += 1
            continue
        base = {"impression_id": ex.impression_id, "user_id": ex.user_id, "ad_id": ex.ad_id,
                "advertiser_id": ex.advertiser_id, "campaign_id": ex.campaign_id, "placement": ex.placement,
                "device": ex.device, "position": ex.position, "impression_time_ms": ex.impression_time_ms,
                "as_of_ms": ex.as_of_ms}
        labels = _labels(ex)
        previous = state.previous(ex.impression_id, pos)
        if scheme == "fnw" and ex.converted and previous is not None and previous["clicked"]:
            labels["ctr_weight"] = 0.0  # FNW's extra positive: its click was learned with the fake negative
        elif ex.is_correction and previous is not None:
            out.rows.append({**base, **previous, "weight": -previous["weight"], "ctr_weight": previous["ctr_weight"]})
            out.counts["superseded"] += 1
        state.record(ex.impression_id, pos, labels)
        out.rows.append({**base, **labels})
        out.counts["learned"] += 1
    return out


def with_features(rows: list[dict], reader) -> pd.DataFrame:
    """The rows with the online store's features for their user and ad (``<view>__<feature>`` columns)."""
    frame = pd.DataFrame(rows)
    if reader is None or frame.empty:
        return frame
    feats = []
    for user_id, group in frame.groupby("user_id", sort=False):
        got = pd.DataFrame(reader.features(int(user_id), group["ad_id"].tolist()).to_feast_dict())
        got.index = group.index
        feats.append(got.drop(columns=["user_id", "ad_id", "advertiser_id"]))
    return frame.join(pd.concat(feats))


class OnlineLearner:
    """The model, its optimizers and progressive metrics: ``learn(batch)`` scores then learns."""

    def __init__(self, model: Ranker, lr: float, device: torch.device, scheme: str):
        self.model, self.device, self.scheme = model.to(device), device, scheme
        self.opts = optimizers(model, lr)
        self.drift = LossDriftMonitor()
        self.losses: list[float] = []
        self.examples = 0

    def learn(self, batch: Batch) -> float:
        """Progressive validation (CTR log loss of rows with a positive weight, before learning), then a step."""
        self.model.eval()
        with torch.no_grad():
            p = self.model(batch.to(self.device), position=False).p_ctr.float().cpu().numpy()
        keep = (batch.weight.numpy() > 0) & (batch.ctr_weight.numpy() > 0 if batch.ctr_weight is not None else True)
        y = batch.label_ctr.numpy()[keep]
        p = np.clip(p[keep], 1e-7, 1 - 1e-7)
        losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        for value in losses:
            self.drift.update(float(value))
        step(self.model, self.opts, batch, self.scheme, self.device)
        self.examples += len(batch)
        mean = float(losses.mean()) if len(losses) else math.nan
        self.losses.append(mean)
        return mean


def start_model(registry: Registry, spec: InputSpec, settings: Settings) -> tuple[Ranker, dict[int, int], str | None]:
    """The newest online version and its offsets; else the promoted model with its CTR logit moved to the
    undownsampled scale (the stream keeps every negative); else a fresh model."""
    online = registry.latest("online")
    if online is not None:
        scoring = load(registry, online)
        offsets = {int(p): o for p, o in scoring.meta.get("kafka_offsets", {}).items()}
        print(f"online: resuming {online} at offsets {offsets}", flush=True)
        return scoring.model, offsets, online
    if registry.promoted() is not None:
        scoring = load(registry)
        if scoring.negative_rate < 1.0:
            scoring.model.shift_ctr_logit(math.log(scoring.negative_rate))
        print(f"online: starting from the promoted {scoring.version} at the beginning of the topic", flush=True)
        return scoring.model, {}, scoring.version
    print("online: no model in the registry: starting from a fresh ranker", flush=True)
    return Ranker.from_settings(spec, settings.trainer), {}, None


def run(settings: Settings, scheme: str | None = None, publish_every_s: float | None = None,
        max_seconds: float | None = None, features: bool = True, idle_exit_s: float | None = None) -> list[str]:
    """Learn until stopped (or ``max_seconds``, or ``idle_exit_s`` without input); returns the versions published."""
    from kafka import KafkaConsumer, TopicPartition

    from feature_repo.online import OnlineReader
    from streams.dead_letter import DeadLetterSink

    cfg = settings.trainer
    scheme = scheme or cfg.label_scheme
    publish_every_s = publish_every_s or cfg.publish_every_s
    registry = Registry(settings.registry_dir)
    spec = InputSpec.from_schemas(cfg.id_buckets, cfg.small_buckets)
    model, offsets, parent = start_model(registry, spec, settings)
    # The circuit breaker's yardstick travels down the lineage: every online version keeps its batch ancestor's.
    reference = registry.load(parent)[1].get("reference") if parent else None
    learner = OnlineLearner(model, cfg.online_learning_rate, pick_device(cfg.device), scheme)
    state = ExampleState(settings.var_dir / "trainers" / "online-state")
    reader = OnlineReader(settings).start() if features else None
    dead = DeadLetterSink(settings, stage="online_trainer")
    topic = settings.topics.training_examples
    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", max_poll_records=cfg.online_batch_size * 8)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(parts)
    for tp in parts:
        if tp.partition in offsets:
            consumer.seek(tp, offsets[tp.partition])
        else:
            consumer.seek_to_beginning(tp)
    position = {tp.partition: consumer.position(tp) for tp in parts}
    published: list[str] = []
    counts: Counter = Counter()
    arrivals: list[int] = []  # Kafka timestamps of the examples learned since the last publication
    began = last_publish = last_input = time.monotonic()

    def publish() -> None:
        nonlocal parent, last_publish
        now_ms = int(time.time() * 1000)
        lag = np.array([now_ms - a for a in arrivals]) / 1000.0 if arrivals else np.zeros(0)
        meta = {"cadence": "online", "parent": parent, "kafka_offsets": {str(p): o for p, o in position.items()},
                "scheme": scheme, "examples": learner.examples, "counts": dict(counts),
                "progressive_ctr_logloss": float(np.nanmean(learner.losses[-50:])) if learner.losses else None,
                "drift_points": list(learner.drift.drift_points),
                "freshness_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99)),
                                "n": int(len(lag))} if len(lag) else None,
                "feature_service": {"name": "ranker", "spec": learner.model.spec.fingerprint()},
                "created_ms": now_ms}
        if reference is not None:
            meta["reference"] = reference
        version = save(registry, ScoringModel(learner.model.cpu()), "online", meta)
        learner.model.to(learner.device)
        registry.promote(version, reason=f"online update after {learner.examples:,} examples")
        published.append(version)
        parent = version
        arrivals.clear()
        last_publish = time.monotonic()
        print(f"online: published {version}: {dict(counts)}, freshness {meta['freshness_s']}", flush=True)

    try:
        while max_seconds is None or time.monotonic() - began < max_seconds:
            polled = consumer.poll(timeout_ms=500)
            batch: list[tuple[Position, TrainingExample]] = []
            stamps: list[int] = []
            for tp, records in sorted(polled.items(), key=lambda kv: kv[0].partition):
                for record in records:
                    ex = dead.decode(TrainingExample, record)
                    if ex is None:
                        counts["dead_letters"] += 1
                    else:
                        batch.append(((record.partition, record.offset), ex))
                        stamps.append(record.timestamp)
                    position[tp.partition] = record.offset + 1
            if batch:
                last_input = time.monotonic()
                rows = to_rows(batch, state, scheme)
                counts.update(rows.counts)
                frame = with_features(rows.rows, reader)
                for start in range(0, len(frame), cfg.online_batch_size):
                    learner.learn(encode(frame.iloc[start:start + cfg.online_batch_size], spec))
                arrivals.extend(stamps)
                last_input = time.monotonic()  # idle means waiting for input, not learning it
            if time.monotonic() - last_publish >= publish_every_s and arrivals:
                publish()
            if idle_exit_s is not None and time.monotonic() - last_input > idle_exit_s:
                break
        if arrivals:
            publish()
    finally:
        consumer.close()
        dead.flush()
        state.close()
        if reader is not None:
            reader.close()
    return published


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.online", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme", choices=["naive", "fnw", "delay_curve"], help="default settings.trainer.label_scheme")
    p.add_argument("--publish-every", type=float, help="seconds between published versions")
    p.add_argument("--max-seconds", type=float, help="stop after this long (default: run until stopped)")
    p.add_argument("--idle-exit", type=float, help="stop after this many seconds without input")
    p.add_argument("--no-features", action="store_true", help="learn from ids and context only (no online store)")
    args = p.parse_args(argv)
    run(get_settings(), args.scheme, args.publish_every, args.max_seconds, features=not args.no_features,
        idle_exit_s=args.idle_exit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
