"""The features serving logged, by impression: what the online trainer learns with (log and join).

The scorer writes one ``prediction_log`` record per shown ad, before the impression is even sent, with every
model input as it read them (``features``, ``feature_lists``, the candidate's catalog ids and the request's
context). :class:`ServedFeatures` reads that topic into a local key-value store (RocksDB in the worker, a dict in
tests) keyed by impression id, and the trainer joins its examples to it. A click example therefore carries the
features of the moment the ad was served: ``user_clicks_1h`` cannot count the click being learned, and the model
learns exactly the inputs serving scored it with.

Why the trainer joins and not the label joiner: the joiner's per-impression state is bounded to a few KB
(``label_joiner.join.StateBounds``) and a logged record is several KB of lists; the trainer is the only reader
that needs them, and keeping them beside its own state means one store to size and one retention rule.

:meth:`ServedFeatures.catch_up` reads the topic up to its end offsets as of the call. The trainer calls it after
polling a batch of examples: serving logs before the impression exists and the joiner emits after the impression,
so a served impression's record is normally in. Records of the simulator's uniform baseline (no model, no
features) are not kept. Entries older than ``retention_days`` before the clock (the minimum over the log's
partitions of their newest event day) are deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from infra.settings import Settings
from schemas.events import BASELINE_MODEL_VERSION, PredictionLog
from streams.state import keys_with_prefix

DAY_MS = 86_400_000
# The context the model saw, taken from the log rather than from the example.
CONTEXT = ("advertiser_id", "campaign_id", "category_id", "placement", "device", "position")


def served_row(log: PredictionLog) -> dict:
    """The model inputs of one logged candidate, as training-frame columns (``<view>__<feature>``, lists, context).

    >>> log = PredictionLog(request_id="r", impression_id="i", user_id=1, ad_id=2, model_version="v1",
    ...                     event_time_ms=1_700_000_000_000, features={"user_realtime__user_clicks_1h": 3.0},
    ...                     pctr=0.1, pcvr=0.2, category_id=4, placement="feed", feature_lists={})
    >>> row = served_row(log)
    >>> row["user_realtime__user_clicks_1h"], row["category_id"], row["served_model_version"]
    (3.0, 4, 'v1')
    """
    row: dict = {name: getattr(log, name) for name in CONTEXT}
    row.update(log.features)
    row.update(log.feature_lists)
    row["served_model_version"] = log.model_version
    row["served_time_ms"] = log.event_time_ms
    return row


class ServedFeatures:
    """Logged model inputs by impression id, read incrementally from the prediction log."""

    def __init__(self, settings: Settings, path: Path | None = None, dead=None) -> None:
        if path is None:
            self.db: dict = {}
        else:
            from rocksdict import Rdict

            from streams.state import rocksdb_options

            path.mkdir(parents=True, exist_ok=True)
            self.db = Rdict(str(path), options=rocksdb_options())
        self.settings = settings
        self.retention_ms = settings.trainer.online_log_retention_days * DAY_MS
        self.dead = dead
        self.topic = settings.topics.prediction_log
        self.consumer = None
        self.read = 0
        self._days: set[int] | None = None  # the days indexed, as in the "days" key (read once)
        self._newest: dict[str, int] = {}  # partition -> newest day logged, as in the "newest" key

    def _consumer(self):
        if self.consumer is None:
            from kafka import KafkaConsumer, TopicPartition

            self.consumer = KafkaConsumer(**self.settings.kafka.client_config(), group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed")
            parts = [TopicPartition(self.topic, p) for p in sorted(self.consumer.partitions_for_topic(self.topic)
                                                                    or ())]
            self.consumer.assign(parts)
            for tp in parts:
                stored = self.db.get(f"pos:{tp.partition}")
                if stored is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, int(stored))
        return self.consumer

    def catch_up(self, timeout_s: float = 30.0) -> int:
        """Read the log up to its end offsets as of now; returns how many records were read."""
        import time

        consumer = self._consumer()
        parts = consumer.assignment()
        if not parts:
            return 0
        end = consumer.end_offsets(list(parts))
        deadline, n = time.monotonic() + timeout_s, 0
        while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in parts):
            for tp, records in consumer.poll(timeout_ms=500).items():
                for record in records:
                    n += self._keep(record)
                self.db[f"pos:{tp.partition}"] = str(consumer.position(tp))
        self.read += n
        return n

    def _keep(self, record) -> int:
        if self.dead is not None:
            log = self.dead.decode(PredictionLog, record)
        else:
            from schemas.codec import decode

            log = decode(PredictionLog, record.value, record.headers)
        if log is None or log.model_version == BASELINE_MODEL_VERSION:
            return 0
        key = f"l:{log.impression_id}"
        if self.db.get(key) is not None:
            return 0  # a producer's retry or a replayed spool: the first record wins
        self.db[key] = orjson.dumps(served_row(log))
        day = log.event_time_ms // DAY_MS
        self.db[f"x:{day:08d}:{log.impression_id}"] = b""  # the retention index: one empty key per record
        self._prune(day, record.partition)
        return 1

    def _prune(self, day: int, partition: int) -> None:
        """Delete whole days older than the retention before the clock: the minimum over partitions of the newest
        day logged (one record with a skewed time cannot delete what the other partitions still need). The list
        of days and the clock are small keys, held in memory."""
        if self._days is None:
            self._days = set(json.loads(self.db.get("days") or "[]"))
            self._newest = json.loads(self.db.get("newest") or "{}")
        if day <= self._newest.get(str(partition), -1) and day in self._days:
            return  # pruning runs when a partition reaches a new day
        self._newest[str(partition)] = max(day, self._newest.get(str(partition), day))
        self.db["newest"] = json.dumps(self._newest)
        days = sorted({*self._days, day})
        keep_from = min(self._newest.values()) - self.retention_ms // DAY_MS
        for day in [d for d in days if d < keep_from]:
            prefix = f"x:{day:08d}:"
            for key in keys_with_prefix(self.db, prefix):
                del self.db[f"l:{key[len(prefix):]}"]
                del self.db[key]
        self._days = {d for d in days if d >= keep_from}
        self.db["days"] = json.dumps(sorted(self._days))

    def get(self, impression_id: str) -> dict | None:
        """The logged row of one impression, or None when serving logged none (or it is past retention)."""
        raw = self.db.get(f"l:{impression_id}")
        return orjson.loads(raw) if raw is not None else None

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if not isinstance(self.db, dict):
            self.db.close()
