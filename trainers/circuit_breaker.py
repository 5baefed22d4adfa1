"""The circuit breaker: a newly promoted model whose served scores drift from its training is rolled back.

    python -m trainers.circuit_breaker [--watch [--every 30]] [--since 2026-11-20T00:00] [--dry-run]

Two signals, measured on the promoted version's own prediction-log records (chosen by their ``model_version``,
never by time: records carry the simulated world's event times, which may lie in the past), explored records
left out (their logged pCTR is a Thompson sample, not the model's). An online version is judged with every
version of its line (``meta["line"]``) that served: a version lives for seconds, and the line takes the risk.

* **prediction shift**: the population stability index of served pCTR against what the version's *parent*
  served (an online line's: its batch root's records), less the PSI two samples of one distribution show by
  chance (:func:`psi_noise`). What a model serves is selected by the auction, so a held-out training sample
  is no yardstick for it; the parent's served records went through the same selection. Not compared when the
  parent served fewer than ``MIN_REFERENCE_ROWS`` records, or when one side serves calibrated scores and the
  other raw ones (an online line serves its raw, stream-scale scores; its batch root a calibrated one). A
  shift is not acted on when the parent was itself miscalibrated on what it served and the shift moves the
  mean prediction toward the rate the parent observed (:func:`shift_toward_observed`): that corrects it;
* **calibration** per task, ``log(mean predicted / observed rate)``: CTR over impressions whose click label is
  final (a matured label, or any training example), up to the label horizon (:func:`click_labels`: the joiner
  emits a click at once but a non-click only when its window closes, so the newest impressions' clicks are
  known first), CVR over clicked impressions whose label matured (a conversion window still open would bias it).

A signal decides only with enough data: ``settings.serving.min_breaker_impressions`` served records (below it,
no decision at all), as many labeled impressions for CTR, a twentieth of it in matured clicks for CVR, and a
calibration gap must also be statistically clear (|z| >= 3 of the observed positives against the predicted).
When PSI crosses ``psi_threshold`` or a task's ``|log ratio|`` crosses ``calibration_threshold``, the registry
rolls back to the previously promoted version with a reason that carries the numbers and the thresholds.

A promotion is rolled back at most once: a version restored by a rollback is judged (for the record) but never
rolled back again, and the promotion is re-read under a lock just before acting, so two breakers never roll back
twice. The reference format (:func:`reference_distribution`)::

    {"rows": n, "bins": {"ctr": {"edges": [...], "shares": [...]}, "cvr": {...}},
     "calibration": {"ctr": {"mean_p", "rate", "n"}, "cvr": {"mean_p", "rate", "n"}}}
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import orjson
import pandas as pd

from infra.settings import ServingSettings, Settings, get_settings
from trainers.registry import Registry, RegistryError

BINS = 10
PSI_EPS = 1e-4  # floor of a bin's share in PSI (an empty bin would make it infinite)
Z_MIN = 3.0  # a calibration gap must also be this many standard errors wide
MIN_EXPECTED_POSITIVES = 10  # fewer (predicted or observed) positives than this: not enough data
CVR_CLICK_SHARE = 20  # CVR needs min_breaker_impressions / CVR_CLICK_SHARE matured clicks
NOT_ENOUGH = "not enough data"
LOG_COLUMNS = ("impression_id", "pctr", "pcvr", "event_time_ms")  # what a verdict reads of a served record
VERSION_RE = re.compile(r"^v(\d+)-")


# -- the reference distribution -------------------------------------------------------------------------------


def quantile_edges(scores: np.ndarray, weights: np.ndarray | None = None, bins: int = BINS) -> list[float]:
    """Interior cut points of ``bins`` weighted quantile bins (ties collapse, so there may be fewer).

    >>> quantile_edges(np.arange(100) / 100, bins=4)
    [0.24, 0.49, 0.74]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return []
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    s, cum = scores[order], np.cumsum(w[order])
    cuts = [float(s[min(np.searchsorted(cum, q * cum[-1]), len(s) - 1)]) for q in np.arange(1, bins) / bins]
    return sorted(set(cuts))


def bin_index(edges: Sequence[float], scores: np.ndarray) -> np.ndarray:
    """Bin of each score: 0 below the first edge, i for ``edges[i-1] < s <= edges[i]``, len(edges) above."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(scores, dtype=np.float64), side="left")


def bin_shares(edges: Sequence[float], scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Share of (weighted) scores in each of the ``len(edges) + 1`` bins."""
    counts = np.bincount(bin_index(edges, scores), weights=weights, minlength=len(edges) + 1).astype(np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def reference_distribution(scores: dict[str, np.ndarray], clicked: np.ndarray, converted: np.ndarray,
                           weights: np.ndarray | None = None, bins: int = BINS) -> dict:
    """A model's reference: quantile bins of its calibrated ``scores["ctr"]`` and ``scores["cvr"]`` over rows
    (weighted: ``1 / sample_rate`` undoes negative downsampling), and per task the mean prediction and the
    observed rate (CTR over every row, CVR over clicked rows)."""
    clicked = np.asarray(clicked, dtype=np.float64)
    converted = np.asarray(converted, dtype=np.float64)
    w = np.ones(len(clicked)) if weights is None else np.asarray(weights, dtype=np.float64)
    out: dict = {"rows": int(len(clicked)), "bins": {}, "calibration": {}}
    for task in ("ctr", "cvr"):
        p = np.asarray(scores[task], dtype=np.float64)
        edges = quantile_edges(p, w, bins)
        out["bins"][task] = {"edges": edges, "shares": bin_shares(edges, p, w).tolist()}
    on = {"ctr": np.ones(len(clicked), dtype=bool), "cvr": clicked > 0.5}
    labels = {"ctr": clicked, "cvr": converted}
    for task, mask in on.items():
        p, y, ww = np.asarray(scores[task], dtype=np.float64)[mask], labels[task][mask], w[mask]
        out["calibration"][task] = {"mean_p": float(np.average(p, weights=ww)) if ww.sum() > 0 else None,
                                    "rate": float(np.average(y, weights=ww)) if ww.sum() > 0 else None,
                                    "n": int(mask.sum())}
    return out


def psi(reference_bins: dict, served_scores: np.ndarray, eps: float = PSI_EPS) -> float:
    """Population stability index of ``served_scores`` against a reference's bins (``{"edges", "shares"}``):
    ``sum((s - r) * ln(s / r))`` over bins, shares floored at ``eps``.

    >>> ref = {"edges": [0.1, 0.2], "shares": [1 / 3, 1 / 3, 1 / 3]}
    >>> round(psi(ref, np.array([0.05, 0.15, 0.25])), 6)
    0.0
    >>> psi(ref, np.full(100, 0.5)) > 2
    True
    """
    served = np.maximum(bin_shares(reference_bins["edges"], served_scores), eps)
    ref = np.maximum(np.asarray(reference_bins["shares"], dtype=np.float64), eps)
    return float(np.sum((served - ref) * np.log(served / ref)))


# -- calibration ----------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """One task's calibration on served impressions: ``status`` is ok, drift or not enough data."""

    task: str
    n: int
    mean_p: float | None = None
    rate: float | None = None
    log_ratio: float | None = None
    z: float | None = None
    status: str = NOT_ENOUGH
    detail: str = ""

    def describe(self, threshold: float) -> str:
        name = self.task.upper()
        if self.status == NOT_ENOUGH:
            return f"{name} calibration: {NOT_ENOUGH} ({self.detail})"
        verdict = "beyond" if self.status == "drift" else "within"
        return (f"{name} calibration log(mean predicted {self.mean_p:.4f} / observed {self.rate:.4f}) = "
                f"{self.log_ratio:+.3f}, {verdict} +-{threshold:g} ({self.n:,} {self.detail}, z {self.z:+.1f})")


def calibration_drift(task: str, predicted: np.ndarray, labels: np.ndarray, *, min_n: int, threshold: float,
                      what: str = "labeled impressions", z_min: float = Z_MIN,
                      min_positives: float = MIN_EXPECTED_POSITIVES, baseline: float | None = None) -> Calibration:
    """``log(mean predicted / observed rate)`` (each count +0.5, so a zero rate stays finite) and the z-score of
    the observed positives against the predicted ones; drift when ``|log ratio| > threshold`` and ``|z| >= z_min``.
    With ``baseline`` (the parent's log ratio on what it served: the auction's winner's curse makes every model
    over-predict its winners a little), predictions are first scaled by ``exp(-baseline)``: drift is measured
    against the parent's calibration, not against perfection.

    >>> rng = np.random.default_rng(0); p = np.full(5000, 0.05); y = rng.random(5000) < 0.05
    >>> calibration_drift("ctr", p, y, min_n=1000, threshold=0.4).status
    'ok'
    >>> calibration_drift("ctr", 3 * p, y, min_n=1000, threshold=0.4).status
    'drift'
    >>> calibration_drift("ctr", p[:10], y[:10], min_n=1000, threshold=0.4).status
    'not enough data'
    """
    p = np.asarray(predicted, dtype=np.float64)
    if baseline is not None:
        p = np.clip(p * math.exp(-baseline), 0.0, 1.0)
        what = f"{what}, against the parent's {baseline:+.3f}"
    y = np.asarray(labels, dtype=np.float64)
    n, expected, observed = len(p), float(p.sum()), float(y.sum())
    if n < min_n:
        return Calibration(task, n, detail=f"{n:,} {what} < {min_n:,}")
    if max(expected, observed) < min_positives:
        return Calibration(task, n, detail=f"{observed:.0f} observed and {expected:.1f} predicted positives "
                                           f"< {min_positives:g}")
    log_ratio = math.log((expected + 0.5) / (observed + 0.5))
    z = (expected - observed) / math.sqrt(max(float((p * (1 - p)).sum()), 1e-9))
    status = "drift" if abs(log_ratio) > threshold and abs(z) >= z_min else "ok"
    return Calibration(task, n, expected / n, observed / n, log_ratio, z, status, what)


# -- the verdict ----------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the breaker concluded about ``version`` (``decision``: ok, rollback or no decision) and did
    (``action``), with a human-readable ``reason`` that carries the numbers and thresholds."""

    decision: str
    version: str | None
    reason: str
    served: int = 0
    psi: dict[str, float | None] = field(default_factory=dict)
    calibration: dict[str, Calibration] = field(default_factory=dict)
    action: str = "none"
    rolled_back_to: str | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "calibration": {k: asdict(v) for k, v in self.calibration.items()}}

    def __str__(self) -> str:
        head = f"circuit breaker: {self.version or '-'}: {self.decision.upper()}"
        return f"{head}: {self.reason}" + (f"\n  action: {self.action}" if self.action != "none" else "")


def psi_noise(bins: int, n: int, m: int) -> float:
    """The PSI two samples of one distribution show by chance (its expectation, ``(bins - 1) (1/n + 1/m)``): the
    breaker subtracts it, so a small sample cannot cross the threshold on noise alone.

    >>> round(psi_noise(10, 500, 500), 4)
    0.036
    """
    return (bins - 1) * (1.0 / max(n, 1) + 1.0 / max(m, 1))


def click_labels(joined: pd.DataFrame) -> pd.DataFrame:
    """The served impressions whose click label is final, for a CTR calibration. The joiner emits a clicked
    example at the click but a non-click only when its click window closes on the joiner's clock, so the newest
    impressions' clicks are known before their non-clicks: counting them would read as under-prediction. Kept:
    impressions no newer than the newest one labeled *not* clicked (the label horizon), when event times are
    known (``event_time_ms``).

    >>> j = pd.DataFrame({"event_time_ms": [1, 2, 3, 4], "clicked": [0.0, 1.0, 0.0, 1.0]})
    >>> click_labels(j)["event_time_ms"].tolist()
    [1, 2, 3]
    """
    known = joined[joined["clicked"].notna()]
    if "event_time_ms" not in known or known["event_time_ms"].isna().all():
        return known
    negatives = known.loc[known["clicked"] == 0, "event_time_ms"]
    return known[known["event_time_ms"] <= negatives.max()] if len(negatives) else known.iloc[0:0]


def served_reference(served: pd.DataFrame, labels: pd.DataFrame | None = None,
                     min_n: int = 200) -> dict:
    """What a version served (explored records left out, repeats once): quantile bins of ``pctr`` and ``pcvr``,
    and per task its calibration ``baseline`` (log mean predicted / observed) where ``min_n`` labels are known."""
    served = served.drop_duplicates("impression_id", keep="first")
    shown = served[~served["explored"].astype(bool)] if "explored" in served else served
    zeros = np.zeros(len(shown))
    out = reference_distribution({"ctr": shown["pctr"].to_numpy(), "cvr": shown["pcvr"].to_numpy()}, zeros, zeros)
    out["baseline"] = {"ctr": None, "cvr": None}
    out["observed"] = {"ctr": None, "cvr": None}
    if labels is not None:
        joined = shown[[c for c in LOG_COLUMNS if c in shown]].merge(labels, on="impression_id", how="inner")
        rows = {"ctr": click_labels(joined),
                "cvr": joined[(joined["clicked"] == 1) & joined["converted"].notna()]}
        for task, column, label in (("ctr", "pctr", "clicked"), ("cvr", "pcvr", "converted")):
            r = rows[task]
            need = min_n if task == "ctr" else max(1, min_n // CVR_CLICK_SHARE)
            if len(r) >= need and max(r[column].sum(), r[label].sum()) >= MIN_EXPECTED_POSITIVES:
                out["baseline"][task] = math.log((r[column].sum() + 0.5) / (r[label].sum() + 0.5))
                out["observed"][task] = float(r[label].mean())
    return out


def usable_baselines(baseline: dict, threshold: float) -> dict:
    """The parent's calibration offsets a child is measured against: only those within ``threshold``. A small
    offset is the auction's winner's curse, which every model shares; a parent off by more was miscalibrated
    itself, and a child that corrects it must not read as drift (it is judged against the observed rate).

    >>> usable_baselines({"ctr": -0.05, "cvr": -1.0}, 0.4)
    {'ctr': -0.05, 'cvr': None}
    """
    return {task: b if b is not None and abs(b) <= threshold else None for task, b in baseline.items()}


def shift_toward_observed(reference: dict, served_pctr: np.ndarray, threshold: float) -> str | None:
    """Why a prediction shift is no evidence of harm, or None. The parent was itself miscalibrated on what it
    served (its log ratio beyond ``threshold``: e.g. a weak model under-predicting the auction's winners), so
    its served distribution is no yardstick; and the child's mean prediction lies closer to the rate the
    parent observed than the parent's did: the shift corrects the parent. Calibration on the child's own
    labels then decides. A shift away from the observed rate (a broken model) is still acted on.

    >>> ref = {"baseline": {"ctr": -0.7}, "observed": {"ctr": 0.075}}
    >>> shift_toward_observed(ref, np.full(100, 0.06), 0.4) is not None
    True
    >>> shift_toward_observed(ref, np.full(100, 0.3), 0.4) is None
    True
    """
    gap = ((reference or {}).get("baseline") or {}).get("ctr")
    rate = ((reference or {}).get("observed") or {}).get("ctr")
    if gap is None or not rate or abs(gap) <= threshold or len(served_pctr) == 0:
        return None
    child = math.log(max(float(np.mean(served_pctr)), 1e-9) / rate)
    if abs(child) >= abs(gap):
        return None
    return (f"the parent was miscalibrated on what it served (log ratio {gap:+.3f}) and this shift moves the mean "
            f"prediction toward the rate it observed ({rate:.4f}: log ratio {child:+.3f})")


def judge(version: str, reference: dict | None, served: pd.DataFrame, labels: pd.DataFrame,
          cfg: ServingSettings, no_reference: str = "PSI: no served reference") -> Verdict:
    """The verdict on ``version`` from its served records (``impression_id, pctr, pcvr, explored``) and the
    labels known (``impression_id, clicked, converted``; NaN where not known yet). ``reference`` is what its
    parent served (:func:`served_reference`), None when there is nothing comparable (``no_reference`` says why).
    Pure: nothing is rolled back. A record logged more than once (a producer's retry, a replayed spool) counts
    once: the first one."""
    served = served.drop_duplicates("impression_id", keep="first")
    shown = served[~served["explored"].astype(bool)] if "explored" in served else served
    n = len(shown)
    if n < cfg.min_breaker_impressions:
        return Verdict("no decision", version, f"{NOT_ENOUGH}: {n:,} served impressions of {version} "
                       f"(explored ones left out) < min_breaker_impressions {cfg.min_breaker_impressions:,}", n)
    crossed, notes = [], []
    psis: dict[str, float | None] = {"ctr": None, "cvr": None}
    if reference and "bins" in reference:
        for task, column in (("ctr", "pctr"), ("cvr", "pcvr")):
            psis[task] = psi(reference["bins"][task], shown[column].to_numpy())
        m = reference.get("rows", 0)
        noise = psi_noise(len(reference["bins"]["ctr"]["shares"]), n, m)
        excess = psis["ctr"] - noise
        text = (f"PSI of served pCTR {psis['ctr']:.3f} less its sampling noise {noise:.3f} = {excess:.3f} "
                f"{'>' if excess > cfg.psi_threshold else '<='} {cfg.psi_threshold:g} ({n:,} impressions vs "
                f"{m:,} the parent served)")
        correction = shift_toward_observed(reference, shown["pctr"].to_numpy(), cfg.calibration_threshold)
        if excess > cfg.psi_threshold and correction:
            notes.append(f"{text}, not acted on: {correction}")
        else:
            (crossed if excess > cfg.psi_threshold else notes).append(text)
    else:
        notes.append(no_reference)
    joined = shown[[c for c in LOG_COLUMNS if c in shown]].merge(labels, on="impression_id", how="inner")
    ctr_rows = click_labels(joined)
    cvr_rows = joined[(joined["clicked"] == 1) & joined["converted"].notna()]
    baseline = usable_baselines((reference or {}).get("baseline") or {}, cfg.calibration_threshold)
    cal = {
        "ctr": calibration_drift("ctr", ctr_rows["pctr"].to_numpy(), ctr_rows["clicked"].to_numpy(),
                                 min_n=cfg.min_breaker_impressions, threshold=cfg.calibration_threshold,
                                 baseline=baseline.get("ctr")),
        "cvr": calibration_drift("cvr", cvr_rows["pcvr"].to_numpy(), cvr_rows["converted"].to_numpy(),
                                 min_n=max(1, cfg.min_breaker_impressions // CVR_CLICK_SHARE),
                                 threshold=cfg.calibration_threshold, what="matured clicks",
                                 baseline=baseline.get("cvr")),
    }
    for c in cal.values():
        (crossed if c.status == "drift" else notes).append(c.describe(cfg.calibration_threshold))
    if crossed:
        return Verdict("rollback", version, "; ".join(crossed), n, psis, cal)
    return Verdict("ok", version, "; ".join(notes), n, psis, cal)


# -- reading Kafka --------------------------------------------------------------------------------------------


def topic_partitions(consumer, topic: str, wait_s: float = 10.0) -> set[int]:
    """The topic's partitions; a metadata request that times out (a busy broker) answers an empty set, so the
    question is asked again for up to ``wait_s`` before the topic is taken for missing."""
    deadline = time.monotonic() + wait_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts or time.monotonic() > deadline:
            return set(parts or ())
        time.sleep(0.25)


class TopicTail:
    """A topic read from its beginning (or from the first record stamped at or after ``since_ms``) up to its end
    offsets at each call, then, call after call, what was appended since. Progress lines every ``every_s``."""

    def __init__(self, settings: Settings, topic: str, since_ms: int | None = None, label: str = "breaker",
                 every_s: float = 5.0):
        from kafka import KafkaConsumer, TopicPartition

        self.topic, self.label, self.every_s = topic, label, every_s
        self.consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=None, enable_auto_commit=False,
                                      isolation_level="read_committed", max_poll_records=5000)
        self.parts = [TopicPartition(topic, p) for p in sorted(topic_partitions(self.consumer, topic))]
        self.read_total = 0
        if not self.parts:
            print(f"{label}: topic {topic} not found: nothing to read", flush=True)
            return
        self.consumer.assign(self.parts)
        self.consumer.seek_to_beginning(*self.parts)
        if since_ms is not None:
            found = self.consumer.offsets_for_times({tp: since_ms for tp in self.parts})
            end = self.consumer.end_offsets(self.parts)
            for tp in self.parts:
                self.consumer.seek(tp, found[tp].offset if found.get(tp) is not None else end[tp])

    def read(self, timeout_s: float = 300.0) -> Iterator:
        """The records up to the end offsets as they are now."""
        if not self.parts:
            return
        end = self.consumer.end_offsets(self.parts)
        total = sum(max(end[tp] - self.consumer.position(tp), 0) for tp in self.parts)
        done, began = 0, time.monotonic()
        last = began
        while any(self.consumer.position(tp) < end[tp] for tp in self.parts):
            if time.monotonic() - began > timeout_s:
                print(f"{self.label}: {self.topic}: stopped after {timeout_s:.0f} s at {done:,}/{total:,} records",
                      flush=True)
                return
            for tp, batch in self.consumer.poll(timeout_ms=500).items():
                for record in batch:
                    if record.offset < end[tp]:
                        done += 1
                        yield record
            if time.monotonic() - last >= self.every_s:
                last = time.monotonic()
                print(f"{self.label}: {self.topic}: {done:,}/{total:,} records "
                      f"({done / max(last - began, 1e-9):,.0f}/s)", flush=True)
        self.read_total += done
        if total >= 10_000:
            print(f"{self.label}: {self.topic}: {done:,} records read", flush=True)

    def close(self) -> None:
        self.consumer.close()


def schema_name(headers) -> str | None:
    for key, value in headers or ():
        if key == "schema":
            return value.decode(errors="replace").partition("/v")[0]
    return None


def decoded(records, name: str, pick: Callable[[dict, object], tuple | None]) -> Iterator[tuple]:
    """``pick(value, record)`` of each record whose ``schema`` header names ``name`` and whose value is a JSON
    object (others are skipped: the validating workers dead-letter them)."""
    for record in records:
        if record.value is None or schema_name(record.headers) not in (name, None):
            continue
        try:
            value = orjson.loads(record.value)
            row = pick(value, record) if isinstance(value, dict) else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if row is not None:
            yield row


def pick_label(value: dict, _record) -> tuple[str, bool, bool]:
    return value["impression_id"], bool(value["clicked"]), bool(value["converted"])


def version_seq(version: str) -> int:
    """The registry sequence number of a version id (-1 for a name outside the registry)."""
    match = VERSION_RE.match(version or "")
    return int(match.group(1)) if match else -1


class ServedLog:
    """Prediction-log records (``pctr``, ``pcvr``, ``explored`` by impression) of the versions worth keeping and
    the labels known of their impressions, read incrementally: each :meth:`update` reads what was appended.

    Versions older (by registry sequence) than the one given to :meth:`update` are forgotten; labels are kept for
    remembered impressions (and, for one more update, for impressions whose log record has not arrived yet)."""

    def __init__(self, settings: Settings, since_ms: int | None = None, label: str = "breaker"):
        t = settings.topics
        self.tails = {name: TopicTail(settings, topic, since_ms, label)
                      for name, topic in (("log", t.prediction_log), ("matured", t.matured_labels),
                                          ("examples", t.training_examples))}
        self.served: dict[str, list[tuple]] = {}
        self.labels: dict[str, list] = {}  # impression -> [clicked, converted (matured only)], None = unknown

    def update(self, oldest: str | None = None) -> None:
        """Read what was appended; keep the records of ``oldest`` and newer versions (all when None)."""
        floor = version_seq(oldest) if oldest else -1

        def pick_log(v: dict, _r) -> tuple | None:
            version = v["model_version"]
            if version_seq(version) < floor:
                return None
            return (version, v["impression_id"], float(v["pctr"]), float(v["pcvr"]), bool(v.get("explored", False)),
                    int(v["event_time_ms"]))

        for version, imp, pctr, pcvr, explored, t in decoded(self.tails["log"].read(), "prediction_log", pick_log):
            self.served.setdefault(version, []).append((imp, pctr, pcvr, explored, t))
        for version in [v for v in self.served if version_seq(v) < floor]:
            del self.served[version]
        fresh: set[str] = set()
        for imp, clicked, converted in decoded(self.tails["matured"].read(), "matured_label", pick_label):
            self.labels[imp] = [float(clicked), float(converted)]
            fresh.add(imp)
        for imp, clicked, _ in decoded(self.tails["examples"].read(), "training_example", pick_label):
            entry = self.labels.setdefault(imp, [None, None])
            entry[0] = max(entry[0] or 0.0, float(clicked))
            fresh.add(imp)
        known = {row[0] for rows in self.served.values() for row in rows}
        self.labels = {k: v for k, v in self.labels.items() if k in known or k in fresh}

    def frame(self, version: str) -> pd.DataFrame:
        rows = self.served.get(version, [])
        return pd.DataFrame(rows, columns=["impression_id", "pctr", "pcvr", "explored", "event_time_ms"])

    def label_frame(self) -> pd.DataFrame:
        return pd.DataFrame([(k, *v) for k, v in self.labels.items()],
                            columns=["impression_id", "clicked", "converted"]).astype(
            {"clicked": "float64", "converted": "float64"})

    def close(self) -> None:
        for tail in self.tails.values():
            tail.close()


# -- acting -----------------------------------------------------------------------------------------------------


def restored_by_rollback(registry: Registry, version: str) -> bool:
    """Whether ``version`` is served because a rollback restored it (its newest promote/rollback event)."""
    for event in reversed(registry.events()):
        if event.get("version") == version and event.get("event") in ("promote", "rollback"):
            return event["event"] == "rollback"
    return False


@contextmanager
def breaker_lock(settings: Settings) -> Iterator[None]:
    """One breaker acts at a time (across processes)."""
    path = settings.var_dir / "circuit_breaker" / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def act(settings: Settings, registry: Registry, verdict: Verdict, promotion: dict) -> Verdict:
    """Roll back the promotion ``verdict`` condemns, unless it was already rolled back or changed meanwhile."""
    with breaker_lock(settings):
        now = registry.promotion()
        if not now or (now["version"], now.get("at_ms")) != (promotion["version"], promotion.get("at_ms")):
            verdict.action = (f"none: the promotion changed while it was judged (now {now and now['version']}): "
                              "not rolled back twice")
            return verdict
        if not [v for v in now.get("previous", []) if v != now["version"]]:
            verdict.action = f"none: nothing to roll back to ({verdict.version} is the only version ever promoted)"
            return verdict
        try:
            verdict.rolled_back_to = registry.rollback(f"circuit breaker: {verdict.reason}")
        except RegistryError as err:
            verdict.action = f"none: nothing to roll back to ({err})"
            return verdict
    verdict.action = f"rolled back from {verdict.version} to {verdict.rolled_back_to}"
    return verdict


MIN_REFERENCE_ROWS = 200  # fewer records served by the parent: no PSI (calibration still decides)


def calibrated(meta: dict) -> bool:
    """Whether a version serves calibrated scores (it carries calibrators)."""
    return bool(meta.get("calibrators"))


def parent_reference(registry: Registry, log: ServedLog, meta: dict, parent: str | None) -> tuple[dict | None, str]:
    """What the parent served, as PSI bins, when comparable: the parent served enough records (through the same
    auction, so both sides carry the same selection), and both serve calibrated scores or both raw ones."""
    if parent is None:
        return None, "PSI: not compared: no parent version"
    try:
        parent_meta = registry.meta(parent)
    except RegistryError as err:
        return None, f"PSI: not compared: cannot read the parent {parent}: {err}"
    if calibrated(parent_meta) != calibrated(meta):
        kinds = {True: "calibrated", False: "uncalibrated"}
        return None, (f"PSI: not compared: {meta['version']} serves {kinds[calibrated(meta)]} scores, its parent "
                      f"{parent} {kinds[calibrated(parent_meta)]} ones")
    frame = log.frame(parent)
    if len(frame) < MIN_REFERENCE_ROWS:
        return None, f"PSI: not compared: the parent {parent} served {len(frame):,} records < {MIN_REFERENCE_ROWS}"
    return served_reference(frame, log.label_frame(), MIN_REFERENCE_ROWS), ""


def line_members(registry: Registry, log: ServedLog, line: str) -> list[str]:
    """The versions of an online line that served records (a line is judged as a whole: each version serves
    for seconds, too few impressions to judge alone)."""
    out = []
    for version in log.served:
        try:
            if registry.meta(version).get("line") == line:
                out.append(version)
        except RegistryError:
            continue
    return sorted(out, key=version_seq)


def check(settings: Settings, registry: Registry | None = None, since_ms: int | None = None, *,
          dry_run: bool = False, log: ServedLog | None = None) -> Verdict:
    """Judge the promoted version on what it served and, when a threshold is crossed, roll it back (unless
    ``dry_run``, or the version was itself restored by a rollback). ``log`` keeps reading across calls."""
    registry = registry or Registry(settings.registry_dir)
    promotion = registry.promotion()
    if promotion is None:
        return Verdict("no decision", None, "nothing is promoted")
    version = promotion["version"]
    try:
        meta = registry.meta(version)
    except RegistryError as err:
        return Verdict("no decision", version, f"cannot read the promoted version: {err}")
    line = meta.get("line")
    parent = meta.get("line_root") if line else meta.get("parent")
    own = log is None
    log = log or ServedLog(settings, since_ms)
    try:
        log.update(oldest=parent or version)
        members = line_members(registry, log, line) if line else [version]
        served, labels = pd.concat([log.frame(v) for v in members], ignore_index=True), log.label_frame()
        reference, why = parent_reference(registry, log, meta, parent)
    finally:
        if own:
            log.close()
    verdict = judge(version, reference, served, labels, settings.serving, no_reference=why)
    if line:
        verdict.reason += f" (judged with its line {line}: {len(members)} versions served)"
    if verdict.decision != "rollback":
        return verdict
    if restored_by_rollback(registry, version):
        verdict.action = (f"none: {version} was restored by a rollback; the breaker rolls a promotion back only "
                          "once (roll back by hand: make rollback)")
        return verdict
    if dry_run:
        verdict.action = "none: dry run"
        return verdict
    return act(settings, registry, verdict, promotion)


def watch(settings: Settings, every_s: float = 30.0, max_checks: int | None = None, dry_run: bool = False,
          since_ms: int | None = None) -> None:
    """Check every ``every_s`` seconds, reading only what was appended since the last check."""
    registry = Registry(settings.registry_dir)
    log = ServedLog(settings, since_ms)
    checks, last = 0, None
    try:
        while max_checks is None or checks < max_checks:
            verdict = check(settings, registry, log=log, dry_run=dry_run)
            line = str(verdict)
            if line != last or verdict.action != "none":
                print(line, flush=True)
            last = line
            checks += 1
            if max_checks is None or checks < max_checks:
                time.sleep(every_s)
    finally:
        log.close()


def parse_time_ms(text: str | None) -> int | None:
    """Epoch milliseconds, or an ISO date/time (UTC when it names no zone)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    when = datetime.fromisoformat(text)
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.circuit_breaker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch", action="store_true", help="keep checking (an always-on breaker)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between checks with --watch")
    p.add_argument("--since", help="read records whose Kafka timestamp is at or after this (epoch ms or ISO; "
                   "prediction logs are stamped with event time, the joiner's outputs with its clock); default all")
    p.add_argument("--dry-run", action="store_true", help="judge, never roll back")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = p.parse_args(argv)
    settings = get_settings()
    if args.watch:
        watch(settings, args.every, dry_run=args.dry_run, since_ms=parse_time_ms(args.since))
        return 0
    verdict = check(settings, since_ms=parse_time_ms(args.since), dry_run=args.dry_run)
    print(json.dumps(verdict.to_json(), indent=2) if args.json else verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
