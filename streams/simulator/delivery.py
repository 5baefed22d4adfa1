"""How the events reach Kafka: the delivery schedule, with duplicates, out-of-order and late deliveries
and malformed payloads, each marked in the ground truth.

Every event gets a delivery time = event time + jitter; a share is held back (out of order, within the
allowed lateness), a share arrives after the allowed lateness (late), a share is delivered twice, and a
share is corrupted. Only deliveries before the horizon are sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pandas as pd

from infra.settings import Settings
from schemas.codec import schema_headers
from schemas.events import Click, Conversion, Event, Impression, NegativeFeedback, PredictionLog
from streams.simulator.config import SimulatorConfig

# New kinds go last: the delivery draws of the earlier ones (one generator, in this order) stay what they were.
KINDS: tuple[type[Event], ...] = (Impression, Click, Conversion, PredictionLog, NegativeFeedback)
CORRUPTIONS = ("truncated", "missing_field", "bad_type", "out_of_range")
MODEL_VERSION = "sim-serving-v1"


@dataclass
class Schedule:
    """Deliveries sorted by time: ``kind`` indexes KINDS, ``row`` indexes that kind's rows."""

    kind: np.ndarray
    row: np.ndarray
    delivery_ms: np.ndarray
    corruption: np.ndarray  # -1: intact, else index into CORRUPTIONS
    payloads: dict[type[Event], list[bytes]]  # JSON value of each row
    keys: dict[type[Event], list[bytes]]
    topics: dict[type[Event], str]

    def __len__(self) -> int:
        return len(self.kind)


def derived_id(impression_ids: pd.Series, tag: str) -> pd.Series:
    """The click (``c``), conversion (``v``) or feedback (``f``) id of an impression: ``-i`` becomes ``-<tag>``, or
    ``-<tag>`` is appended to an id without one (the closed loop's ``<request>-<position>``)."""
    replaced = impression_ids.str.replace("-i", f"-{tag}", n=1, regex=False)
    return replaced.where(replaced != impression_ids, impression_ids + f"-{tag}")


def event_rows(truth: pd.DataFrame, cfg: SimulatorConfig) -> dict[type[Event], pd.DataFrame]:
    """The records of each kind that happened before the run's horizon, shaped by their schema."""
    imp = truth
    if "model_version" not in truth:  # the open loop's serving; a closed-loop run names the scorer's model
        imp = truth.assign(model_version=MODEL_VERSION, feature_ref=truth["impression_id"])
    clicked = truth[truth["clicked"]]
    clicks = pd.DataFrame({
        "click_id": derived_id(clicked["impression_id"], "c"),
        "impression_id": clicked["impression_id"], "user_id": clicked["user_id"],
        "ad_id": clicked["ad_id"], "event_time_ms": clicked["click_time_ms"]}, index=clicked.index)
    conv = truth[truth["converts"]]
    conversions = pd.DataFrame({
        "conversion_id": derived_id(conv["impression_id"], "v"),
        "click_id": derived_id(conv["impression_id"], "c"),
        "impression_id": conv["impression_id"], "user_id": conv["user_id"], "ad_id": conv["ad_id"],
        "event_time_ms": conv["conversion_time_ms"], "value": conv["conversion_value"]}, index=conv.index)
    out = {Impression: imp[Impression.field_names()], Click: clicks, Conversion: conversions}
    if "negative" in truth:
        neg = truth[truth["negative"]]
        out[NegativeFeedback] = pd.DataFrame({
            "feedback_id": derived_id(neg["impression_id"], "f"), "impression_id": neg["impression_id"],
            "user_id": neg["user_id"], "ad_id": neg["ad_id"], "kind": neg["feedback_kind"],
            "event_time_ms": neg["feedback_time_ms"]}, index=neg.index)
    if cfg.prediction_log:
        feats = [{"position": float(p), "bid": float(b), "hour_of_day": float((t // 3_600_000) % 24)}
                 for p, b, t in zip(truth["position"], truth["bid"], truth["event_time_ms"], strict=True)]
        out[PredictionLog] = pd.DataFrame({
            "request_id": truth["request_id"], "impression_id": truth["impression_id"],
            "user_id": truth["user_id"], "ad_id": truth["ad_id"], "model_version": MODEL_VERSION,
            "event_time_ms": truth["event_time_ms"], "features": feats,
            "pctr": truth["served_pctr"], "pcvr": truth["served_pcvr"]}, index=truth.index)
    return out


def build_schedule(truth: pd.DataFrame, cfg: SimulatorConfig, settings: Settings,
                   rng: np.random.Generator, drain: bool = False) -> Schedule:
    """Decide when (and how) every event is delivered; mark delivery defects in ``truth`` in place.

    ``drain`` also delivers what happens after the run's end (conversions up to the window's end), so
    that every window can close.
    """
    frames = event_rows(truth, cfg)
    lateness_ms = settings.windows.allowed_lateness_s * 1000
    kinds, rows, delivery, corruption = [], [], [], []
    for k, cls in enumerate(KINDS):
        frame = frames.get(cls)
        if frame is None or frame.empty:
            continue
        n = len(frame)
        t = frame["event_time_ms"].to_numpy()
        delay = rng.exponential(cfg.delivery_jitter_mean_s * 1000, n)
        ooo = rng.random(n) < cfg.out_of_order_share
        delay = np.where(ooo, delay + rng.uniform(0, cfg.out_of_order_max_s * 1000, n), delay)
        late = (rng.random(n) < cfg.late_share) & (cls is not PredictionLog)
        delay = np.where(late, lateness_ms + rng.uniform(60_000, 3_600_000, n), delay)
        bad = np.where(rng.random(n) < cfg.malformed_share, rng.integers(0, len(CORRUPTIONS), n), -1)
        dup = rng.random(n) < cfg.duplicate_share
        dup_delay = delay + rng.uniform(0, 60_000, n)
        when = (t + delay).astype(np.int64)
        name = cls.NAME
        idx = frame.index.to_numpy()
        for col, values in ((f"{name}_late", late), (f"{name}_malformed", bad >= 0), (f"{name}_duplicated", dup),
                            (f"{name}_delivered", (when < cfg.end_ms) | drain)):
            truth[col] = False
            truth.loc[idx, col] = values
        truth[f"{name}_delivery_ms"] = -1
        truth.loc[idx, f"{name}_delivery_ms"] = when
        rows_k = np.concatenate([np.arange(n), np.flatnonzero(dup)])
        when_k = np.concatenate([when, (t + dup_delay).astype(np.int64)[dup]])
        bad_k = np.concatenate([bad, bad[dup]])
        kinds.append(np.full(len(rows_k), k))
        rows.append(rows_k)
        delivery.append(when_k)
        corruption.append(bad_k)
    kind, row = np.concatenate(kinds), np.concatenate(rows)
    when, bad = np.concatenate(delivery), np.concatenate(corruption)
    keep = np.ones(len(when), bool) if drain else when < cfg.end_ms
    order = np.argsort(when[keep], kind="stable")
    t = settings.topics
    topic_of = {Impression: t.impressions, Click: t.clicks, Conversion: t.conversions,
                PredictionLog: t.prediction_log, NegativeFeedback: t.negative_feedback}
    return Schedule(kind=kind[keep][order], row=row[keep][order], delivery_ms=when[keep][order],
                    corruption=bad[keep][order],
                    payloads={cls: to_json_lines(f) for cls, f in frames.items()},
                    keys={cls: [k.encode() for k in f["impression_id"]] for cls, f in frames.items()},
                    topics={cls: topic_of[cls] for cls in frames})


def to_json_lines(frame: pd.DataFrame) -> list[bytes]:
    """One JSON object per row (pandas' C encoder: several times faster than a per-row loop)."""
    text = frame.to_json(orient="records", lines=True, double_precision=15)
    return text.encode().split(b"\n")[: len(frame)]


def corrupt(payload: bytes, how: str) -> bytes:
    """A payload that fails validation in the stated way."""
    if how == "truncated":
        return payload[:-7]
    record = orjson.loads(payload)
    if how == "missing_field":
        return orjson.dumps({k: v for k, v in record.items() if k != "event_time_ms"})
    if how == "bad_type":
        return orjson.dumps({**record, "user_id": "not-a-number"})
    return orjson.dumps({**record, "event_time_ms": -5})


def iter_messages(schedule: Schedule) -> Iterator[tuple[str, bytes, bytes, list, int]]:
    """(topic, key, value, headers, delivery_ms) for every delivery, in delivery order."""
    by_kind = [(schedule.topics.get(cls), schedule.keys.get(cls), schedule.payloads.get(cls),
                schema_headers(cls)) for cls in KINDS]
    for k, r, when, bad in zip(schedule.kind.tolist(), schedule.row.tolist(), schedule.delivery_ms.tolist(),
                               schedule.corruption.tolist(), strict=True):
        topic, keys, payloads, headers = by_kind[k]
        value = payloads[r] if bad < 0 else corrupt(payloads[r], CORRUPTIONS[bad])
        yield topic, keys[r], value, headers, when
