"""Streaming online updates: the ranker learns from the joiner's training examples as they arrive.

    python -m trainers.online [--scheme fnw] [--publish-every 10] [--max-seconds N]

**One model line.** Batch versions (the weekly full retrain, the daily warm starts) form the spine of the
registry; the online trainer runs a *line* off the newest promoted batch version that was never rolled back
(``Registry.batch_head``), the line's *root*:

- a new line loads the root (its CTR logit moved to the undownsampled scale: the stream keeps every negative)
  and starts reading at the offsets where the root's data ended: per partition, the first offset of an example
  whose impression falls after the root's ``data_range`` (the trainer keeps that index of the topic, by UTC
  day; the joiner's outputs carry its wall clock as Kafka timestamp, so ``offsets_for_times`` cannot find it).
  Examples of impressions inside the root's data range are skipped, never learned twice (``in_batch_data``);
- a restart resumes the line's newest version at its stored offsets, with its Adam state;
- at every publication the trainer re-reads the registry: when a newer batch version was promoted, or the line
  was rolled back (a rolled-back version taints its whole line: ``Registry.tainted``), the line ends and a new
  one starts from the batch head.

Every version records ``line``, ``line_root``, ``skip_until_ms`` and ``learned_range`` (the impression-time span
the line learned), so ``warm_start`` can refuse a day an ancestor saw.

**Per input batch** (``training_examples``, every partition, ``read_committed``):

1. **drop repeats** by ``example_id``: the first position (partition, offset) of each id is kept on disk; an id
   met again at another position is a repeat (a replay of the joiner), the same position is a re-read (after a
   restart, or by a new line) and is learned again;
2. **served features**: each example is joined by impression id to the features serving logged
   (``trainers.served_features``): the model learns what it was scored with, read before the event it learns.
   An impression with no log record is not learned online (``unlogged``): the simulator's uniform bootstrap
   traffic (no model served it) is left to the batch line, which joins point-in-time features from the lake; a
   *served* impression without a record is also a dead letter (``no prediction log record``);
3. **delay correction** as configured: FNW weights (``trainers/loss.py``), delay-curve soft labels, and
   corrections that *supersede* (the earlier example is learned once more with the negated weight);
4. mini-batch updates: Adam with a warm-up then 1/sqrt decay, dense gradients clipped, and progressive
   validation: each batch is scored before it is learned, by the line and by the promoted version.

**Gated promotion.** Every ``publish_every_s`` a version is registered (``cadence=online``) with the input
offsets it learned up to; it is promoted only when its progressive CTR log loss on the newest examples (a
window of ``online_gate_window``, at least ``online_gate_min_examples``) is no worse than the *reference's* on
the same examples by ``online_gate_margin`` (``meta["gate"]`` has the numbers). The reference is the version
that was promoted when the line began (usually its batch root) and stays while the line promotes its own
versions, so after the window first fills every publication can promote (freshness at low rates); a version
promoted by anyone else (a batch model, a rollback) becomes the new reference and the window restarts. The
circuit breaker judges a line as a whole.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.settings import Settings, TrainerSettings, get_settings
from schemas.events import BASELINE_MODEL_VERSION, TrainingExample
from streams.state import keys_with_prefix
from trainers.data import Batch, InputSpec, encode
from trainers.model import Ranker, pick_device
from trainers.registry import Registry
from trainers.river_baseline import LossDriftMonitor
from trainers.scoring import ScoringModel, load, save
from trainers.train import optimizers, step

Position = tuple[int, int]  # (partition, offset)
DAY_MS = 86_400_000
INDEX_DAYS = 60  # days of the topic's offset index kept per partition


class ExampleState:
    """Per example id its first position, per impression the labels learned so far (by position), and per
    partition the first offset of each UTC impression day (where a line off a batch model starts).

    Backed by a dict (tests) or a RocksDB folder (the worker), keys ``e:<example_id>``, ``i:<impression>``,
    ``o:<partition>`` (day -> first offset) and ``n:<partition>`` (the next offset not yet indexed).

    **Bounded.** Each ``e:``/``i:`` key is indexed under its impression's UTC day (``x:<day>:<key>``). The joiner
    emits no example for an impression later than its windows and lateness after it (it dead-letters what comes
    later), so once the state's clock is ``retention_ms`` past a day, that day's keys are deleted. The clock is
    the minimum over partitions of the newest impression time read: one record with a skewed time cannot expire
    the other partitions' state, and a quiet partition holds the clock (state is kept, never lost early). Keys
    written before this index existed are never expired."""

    def __init__(self, path: Path | None = None, retention_ms: int | None = None):
        if path is None:
            self.db: dict = {}
        else:
            from rocksdict import Rdict

            from streams.state import rocksdb_options

            path.mkdir(parents=True, exist_ok=True)
            self.db = Rdict(str(path), options=rocksdb_options())
        self.retention_ms = retention_ms
        self.newest: dict[str, int] = json.loads(self.db.get("x:newest") or "{}")  # partition -> impression ms
        self.days: set[int] = set(json.loads(self.db.get("x:days") or "[]"))
        self.expired = 0

    def _put(self, key: str, value: str, impression_time_ms: int) -> None:
        if key not in self.db:
            day = impression_time_ms // DAY_MS
            self.db[f"x:{day:08d}:{key}"] = ""
            if day not in self.days:
                self.days.add(day)
                self.db["x:days"] = json.dumps(sorted(self.days))
        self.db[key] = value

    def first_seen(self, ex: TrainingExample, pos: Position) -> bool:
        """True when this position is the example's first (or the same record read again after a restart)."""
        key = f"e:{ex.example_id}"
        first = self.db.get(key)
        if first is None:
            self._put(key, json.dumps(pos), ex.impression_time_ms)
            return True
        return tuple(json.loads(first)) == pos

    def previous(self, impression_id: str, pos: Position) -> dict | None:
        """The labels learned for the impression before ``pos`` (entries at or after it are forgotten)."""
        raw = self.db.get(f"i:{impression_id}")
        history = [h for h in json.loads(raw) if tuple(h["pos"]) < pos] if raw else []
        return history[-1] if history else None

    def record(self, ex: TrainingExample, pos: Position, labels: dict) -> None:
        key = f"i:{ex.impression_id}"
        raw = self.db.get(key)
        history = [h for h in json.loads(raw) if tuple(h["pos"]) < pos] if raw else []
        history.append({"pos": list(pos), **labels})
        self._put(key, json.dumps(history[-4:]), ex.impression_time_ms)

    def expire(self, seen: list[tuple[int, int, int]]) -> int:
        """Move the clock by ``(partition, offset, impression_time_ms)`` read, and delete the keys of every day
        ``retention_ms`` behind it; returns how many keys were deleted."""
        if self.retention_ms is None or not seen:
            return 0
        for partition, _offset, t in seen:
            self.newest[str(partition)] = max(self.newest.get(str(partition), t), t)
        self.db["x:newest"] = json.dumps(self.newest)
        now = min(self.newest.values())
        old = sorted(d for d in self.days if (d + 1) * DAY_MS <= now - self.retention_ms)
        deleted = 0
        for day in old:
            prefix = f"x:{day:08d}:"
            for index_key in keys_with_prefix(self.db, prefix):
                del self.db[index_key[len(prefix):]]
                del self.db[index_key]
                deleted += 1
            self.days.discard(day)
        if old:
            self.db["x:days"] = json.dumps(sorted(self.days))
        self.expired += deleted
        return deleted

    def live_keys(self) -> int:
        """Live ``e:``/``i:`` keys (it walks the store: for tests and reports)."""
        keys = self.db if isinstance(self.db, dict) else self.db.keys()
        return sum(1 for k in keys if k[:2] in ("e:", "i:"))

    def index(self, seen: list[tuple[int, int, int]]) -> None:
        """Note ``(partition, offset, impression_time_ms)`` of examples read: the first offset of each day."""
        by_partition: dict[int, list[tuple[int, int]]] = {}
        for partition, offset, t in seen:
            by_partition.setdefault(partition, []).append((offset, t))
        for partition, rows in by_partition.items():
            days = {int(k): v for k, v in json.loads(self.db.get(f"o:{partition}") or "{}").items()}
            for offset, t in rows:
                day = t // DAY_MS
                days[day] = min(days.get(day, offset), offset)
            newest = max(days)
            days = {d: o for d, o in days.items() if d > newest - INDEX_DAYS}
            self.db[f"o:{partition}"] = json.dumps(days)
            nxt = int(self.db.get(f"n:{partition}") or 0)
            self.db[f"n:{partition}"] = str(max(nxt, max(o for o, _ in rows) + 1))

    def start_offsets(self, partitions: list[int], from_ms: int) -> dict[int, int]:
        """Per partition, where examples of impressions at or after ``from_ms`` (a UTC midnight) begin: the first
        offset of such a day, else the next offset not yet read; partitions never read are left out (the
        beginning)."""
        out = {}
        for partition in partitions:
            raw = self.db.get(f"o:{partition}")
            if raw is None:
                continue
            later = [o for d, o in json.loads(raw).items() if int(d) * DAY_MS >= from_ms]
            out[partition] = min(later) if later else int(self.db.get(f"n:{partition}") or 0)
        return out

    def close(self) -> None:
        if not isinstance(self.db, dict):
            self.db.close()


def _labels(ex: TrainingExample) -> dict:
    return {"label_ctr": float(ex.label_ctr), "label_ctcvr": float(ex.label_ctcvr), "clicked": ex.clicked,
            "weight": float(ex.weight), "ctr_weight": 1.0,
            "label_neg": float("nan") if ex.label_neg is None else float(ex.label_neg)}


@dataclass
class Rows:
    """Training rows of one input batch, before features: one dict per row (learned in order)."""

    rows: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def to_rows(examples: list[tuple[Position, TrainingExample]], state: ExampleState, scheme: str,
            served: dict[str, dict] | None = None, cancel: bool = False) -> Rows:
    """Apply repeat dropping and the delay-correction scheme to examples in arrival order; with ``served``
    (impression id -> the logged model inputs), each row carries them. With ``cancel`` (the trainer, per input
    batch: rows learned together), a correction of an example in the same call cancels it (neither is learned,
    so the pair never counts in the loss normaliser); otherwise, or for one learned earlier, the superseded
    example is learned again with the negated weight (its gradient taken back) before the new one."""
    out = Rows()
    pending: dict[str, int] = {}  # impression -> index of its row in this call
    for pos, ex in examples:
        if not state.first_seen(ex, pos):
            out.counts["repeats"] += 1
            continue
        base = {"impression_id": ex.impression_id, "user_id": ex.user_id, "ad_id": ex.ad_id,
                "advertiser_id": ex.advertiser_id, "campaign_id": ex.campaign_id, "placement": ex.placement,
                "device": ex.device, "position": ex.position, "impression_time_ms": ex.impression_time_ms,
                "as_of_ms": ex.as_of_ms, "partition": pos[0], "offset": pos[1]}
        if served is not None:
            base.update(served[ex.impression_id])
        labels = _labels(ex)
        previous = state.previous(ex.impression_id, pos)
        if scheme == "fnw" and ex.converted and previous is not None and previous["clicked"]:
            labels["ctr_weight"] = 0.0  # FNW's extra positive: its click was learned with the fake negative
        elif ex.is_correction and previous is not None:
            out.counts["superseded"] += 1
            if cancel and ex.impression_id in pending:  # not learned yet: drop it, not learn it and take it back
                out.rows[pending.pop(ex.impression_id)] = None
                out.counts["cancelled"] += 1
            else:
                out.rows.append({**base, **previous, "weight": -previous["weight"],
                                 "ctr_weight": previous["ctr_weight"]})
        state.record(ex, pos, labels)
        pending[ex.impression_id] = len(out.rows)
        out.rows.append({**base, **labels})
        out.counts["learned"] += 1
    out.rows = [row for row in out.rows if row is not None]
    return out


def learning_rate(cfg: TrainerSettings, steps: int) -> float:
    """The online rate after ``steps`` updates of a line: linear warm-up, then (with ``online_decay_steps`` > 0)
    1/sqrt decay with a floor.

    >>> from infra.settings import TrainerSettings
    >>> cfg = TrainerSettings(online_learning_rate=1.0, online_warmup_steps=10, online_decay_steps=100)
    >>> [round(learning_rate(cfg, s), 3) for s in (0, 9, 10, 300, 10**9)]
    [0.1, 1.0, 1.0, 0.506, 0.1]
    >>> learning_rate(cfg.model_copy(update={"online_decay_steps": 0}), 10**9)
    1.0
    """
    warm = min(1.0, (steps + 1) / max(cfg.online_warmup_steps, 1))
    if cfg.online_decay_steps <= 0:
        return cfg.online_learning_rate * warm  # no decay: the stream never ends, the rate keeps following drift
    decay = 1.0 / math.sqrt(1.0 + max(steps - cfg.online_warmup_steps, 0) / cfg.online_decay_steps)
    return cfg.online_learning_rate * warm * max(decay, cfg.online_min_lr_factor)


def _logloss(model: Ranker, batch: Batch, keep: np.ndarray, device: torch.device) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        p = model(batch, position=False).p_ctr.float().cpu().numpy()
    y = batch.label_ctr.numpy()[keep]
    p = np.clip(p[keep], 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


class OnlineLearner:
    """The model, its optimizers and progressive metrics: ``learn(batch)`` scores (by the line and by the
    gate's reference, the *incumbent*) then learns; :meth:`gate` compares the two over the newest examples."""

    def __init__(self, model: Ranker, cfg: TrainerSettings, device: torch.device, scheme: str, steps: int = 0):
        self.model, self.cfg, self.device, self.scheme = model.to(device), cfg, device, scheme
        self.opts = optimizers(model, cfg.online_learning_rate, cfg.online_wide_learning_rate_scale)
        self.drift = LossDriftMonitor()
        self.losses: list[float] = []
        self.examples = 0
        self.steps = steps
        self.incumbent: Ranker | None = None
        self.incumbent_version: str | None = None
        self.window: deque[tuple[int, float, float]] = deque()  # per batch: rows, line loss sum, incumbent's

    def set_incumbent(self, model: Ranker | None, version: str | None) -> None:
        """Compare against ``model`` from now on (the window restarts: both must score the same examples)."""
        self.incumbent = model.to(self.device) if model is not None else None
        self.incumbent_version = version
        self.window.clear()

    def learn(self, batch: Batch) -> float:
        """Progressive validation (CTR log loss of rows with a positive weight, before learning), then a step."""
        keep = (batch.weight.numpy() > 0) & (batch.ctr_weight.numpy() > 0 if batch.ctr_weight is not None else True)
        on_device = batch.to(self.device)
        losses = _logloss(self.model, on_device, keep, self.device)
        if self.incumbent is not None and len(losses):
            theirs = _logloss(self.incumbent, on_device, keep, self.device)
            self.window.append((len(losses), float(losses.sum()), float(theirs.sum())))
            while sum(n for n, _, _ in self.window) - self.window[0][0] >= self.cfg.online_gate_window:
                self.window.popleft()
        for value in losses:
            self.drift.update(float(value))
        lr = learning_rate(self.cfg, self.steps)
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        step(self.model, self.opts, batch, self.scheme, self.device, clip_norm=self.cfg.online_clip_norm)
        self.steps += 1
        self.examples += len(batch)
        mean = float(losses.mean()) if len(losses) else math.nan
        self.losses.append(mean)
        return mean

    def promoted_own(self, version: str) -> None:
        """The line's own ``version`` was just promoted. The gate keeps its reference (the model the line started
        against, usually the batch root) and its sliding window, so the next version is judged on the newest
        ``online_gate_window`` examples at once instead of waiting for ``online_gate_min_examples`` new ones.
        With no reference yet (nothing was promoted when the line began), this first version becomes it."""
        if self.incumbent is None:
            self.set_incumbent(copy.deepcopy(self.model), version)

    def gate(self) -> dict:
        """Whether the line beats the incumbent on the newest examples (both scored before the line learned)."""
        n = sum(w[0] for w in self.window)
        out = {"against": self.incumbent_version, "examples": n, "margin": self.cfg.online_gate_margin,
               "min_examples": self.cfg.online_gate_min_examples}
        if self.incumbent is None:
            return {**out, "passed": True, "why": "nothing promoted to compare against"}
        if n < self.cfg.online_gate_min_examples:
            return {**out, "passed": False, "why": "not enough examples since the reference changed"}
        line = sum(w[1] for w in self.window) / n
        theirs = sum(w[2] for w in self.window) / n
        passed = line <= theirs * (1 + self.cfg.online_gate_margin)
        return {**out, "line_logloss": line, "incumbent_logloss": theirs, "passed": passed,
                "why": f"progressive log loss {line:.5f} {'<=' if passed else '>'} {theirs:.5f} x (1 + "
                       f"{self.cfg.online_gate_margin:g})"}

    def optimizer_state(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.opts], "steps": self.steps}

    def load_optimizer_state(self, state: dict) -> None:
        for opt, s in zip(self.opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.steps = int(state["steps"])


def day_end_ms(days: list[str]) -> int:
    """The UTC midnight after the newest of ``days`` (``YYYY-MM-DD``); 0 when there are none.

    >>> day_end_ms(["2026-11-01", "2026-11-02"]) == int(datetime(2026, 11, 3, tzinfo=UTC).timestamp() * 1000)
    True
    """
    if not days:
        return 0
    newest = max(date.fromisoformat(d) for d in days)
    return int(datetime(newest.year, newest.month, newest.day, tzinfo=UTC).timestamp() * 1000) + DAY_MS


def stream_scale(scoring: ScoringModel) -> Ranker:
    """The model with its CTR logit on the stream's (undownsampled) scale."""
    if scoring.negative_rate < 1.0:
        scoring.model.shift_ctr_logit(math.log(scoring.negative_rate))
    return scoring.model


@dataclass
class Line:
    """Where the online trainer stands: its model, the batch root, the line's newest version and its input."""

    model: Ranker
    line_root: str | None
    parent: str | None  # the line's newest registered version (the root before the first)
    line: str
    offsets: dict[int, int]  # partitions left out start at the beginning
    skip_until_ms: int  # impressions before this are the root's data
    learned_range: list[int] | None  # [first, last] impression time learned by the line
    data_range: list[str] = field(default_factory=list)  # the root's batch days (the line's model saw them)
    optimizer: dict | None = None  # the Adam state and step count of a resumed line

    def describe(self) -> dict:
        return {"line_root": self.line_root, "parent": self.parent, "line": self.line,
                "skip_until_ms": self.skip_until_ms,
                "learned_range": self.learned_range, "data_range": self.data_range}


class Checkpoint:
    """The trainer's own resume point, beside its example state (not in the registry: only promoted versions go
    there): the model, its Adam state, the line and the input offsets it has learned up to, replaced atomically."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, line: Line, learner: OnlineLearner, offsets: dict[int, int]) -> None:
        tmp = self.path.with_suffix(".tmp")
        state = {"model": {k: v.detach().cpu() for k, v in learner.model.state_dict().items()},
                 "model_config": json.dumps(learner.model.config), "optimizer": learner.optimizer_state(),
                 "line": json.dumps(line.describe()), "offsets": json.dumps({str(p): o for p, o in offsets.items()})}
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(self) -> tuple[Line, dict] | None:
        if not self.path.exists():
            return None
        from trainers.model import model_from_config

        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model = model_from_config(json.loads(state["model_config"]))
        model.load_state_dict(state["model"])
        info = json.loads(state["line"])
        offsets = {int(p): o for p, o in json.loads(state["offsets"]).items()}
        info.setdefault("line_root", info.pop("root", None))  # a checkpoint written before the rename
        line = Line(model, info["line_root"], info["parent"], info["line"], offsets, int(info["skip_until_ms"]),
                    info["learned_range"], info["data_range"], state["optimizer"])
        return line, info


def start_line(registry: Registry, spec: InputSpec, settings: Settings, state: ExampleState,
               partitions: list[int], checkpoint: Checkpoint | None = None) -> Line:
    """Resume the checkpointed line when it is still live (its root is the batch head and nothing of it was
    rolled back); else start a new line off the batch head (a fresh ranker when there is none)."""
    head = registry.batch_head()
    kept = checkpoint.load() if checkpoint is not None else None
    if kept is not None:
        line, _ = kept
        culprit = registry.tainted(line.parent) if line.parent else None
        if line.line_root == head and not culprit:
            print(f"online: resuming line {line.line} (newest version {line.parent}) at offsets {line.offsets}",
                  flush=True)
            return line
        why = f"{culprit} was rolled back" if culprit else f"the batch head is now {head}"
        print(f"online: the checkpointed line {line.line} ended: {why}", flush=True)
    if head is None:
        print("online: no promoted batch model: a new line from a fresh ranker", flush=True)
        model, days = Ranker.from_settings(spec, settings.trainer), []
    else:
        scoring = load(registry, head)
        model, days = stream_scale(scoring), scoring.meta.get("data_range", [])
    skip_until = day_end_ms(days)
    offsets = state.start_offsets(partitions, skip_until)
    line = registry.new_line(head, {"offsets": {str(p): o for p, o in offsets.items()}, "skip_until_ms": skip_until})
    print(f"online: new line {line} off {head}: impressions from {skip_until} ms, offsets {offsets or 'beginning'}",
          flush=True)
    return Line(model, head, head, line, offsets, skip_until, None, days)


def delta_base(registry: Registry, line: Line, chain: int) -> str | None:
    """What a new version of ``line`` is stored as a delta over: the line's previous version (the rows touched
    since it, plus the dense parameters) while the chain is shorter than ``chain``, else the batch
    root (a key frame: every row the line changed), so loading a cold version applies a bounded number of deltas."""
    if line.parent is None or line.parent == line.line_root:
        return line.line_root
    depth = int(registry.meta(line.parent).get("delta_depth", 0))
    return line.parent if depth < chain else line.line_root


def incumbent_of(registry: Registry, line: Line | None = None) -> tuple[Ranker | None, str | None]:
    """The gate's reference on the stream's scale, what a new online version must not be worse than: the
    promoted version, or, when that is ``line``'s own newest version (a restart), the reference that version was
    judged against, if it still exists and was never rolled back."""
    version = registry.promoted()
    if version is None:
        return None, None
    if line is not None and version == line.parent:
        against = (registry.meta(version).get("gate") or {}).get("against")
        if against and against in registry.names() and not registry.tainted(against):
            version = against
    return stream_scale(load(registry, version)), version


def report_position(consumer, topic: str, position: dict[int, int]) -> None:
    """Commit the positions checkpointed to the monitoring group; a failure is printed, never fatal (the
    checkpoint, not the group, is what a restart resumes from)."""
    from kafka import TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in position.items()})
    except KafkaError as err:
        print(f"online: could not report the position to the monitoring group: {err!r}", flush=True)


def run(settings: Settings, scheme: str | None = None, publish_every_s: float | None = None,
        max_seconds: float | None = None, features: bool = True, idle_exit_s: float | None = None) -> list[str]:
    """Learn until stopped (or ``max_seconds``, or ``idle_exit_s`` without input); returns the versions published.
    ``features=False`` learns from ids and context only (no prediction log: tests, a cold start)."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.dead_letter import DeadLetterSink, make_dead_letter
    from trainers.served_features import ServedFeatures

    cfg = settings.trainer
    scheme = scheme or cfg.label_scheme
    publish_every_s = publish_every_s or cfg.publish_every_s
    registry = Registry(settings.registry_dir)
    spec = InputSpec.from_schemas(cfg.id_buckets, cfg.small_buckets)
    device = pick_device(cfg.device)
    state_dir = settings.var_dir / "trainers"
    state = ExampleState(state_dir / "online-state",
                         retention_ms=int((settings.windows.open_for_s() + cfg.example_state_margin_s) * 1000))
    checkpoint = Checkpoint(state_dir / "online-checkpoint.pt")
    dead = DeadLetterSink(settings, stage="online_trainer")
    served = ServedFeatures(settings, state_dir / "served-features", dead=dead) if features else None
    topic = settings.topics.training_examples
    # The checkpoint holds the offsets a line resumes at; the group's committed offsets only show the trainer's
    # lag to the usual tools (kafka-consumer-groups.sh, the soak's plot). Partitions are assigned, never balanced.
    consumer = KafkaConsumer(**settings.kafka.client_config(), group_id=cfg.online_group_id, enable_auto_commit=False,
                             isolation_level="read_committed", max_poll_records=cfg.online_batch_size * 8)
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    consumer.assign(parts)
    published: list[str] = []
    began = time.monotonic()

    def begin() -> tuple[Line, OnlineLearner]:
        line = start_line(registry, spec, settings, state, [tp.partition for tp in parts], checkpoint)
        learner = OnlineLearner(line.model, cfg, device, scheme)
        if line.optimizer is not None:
            learner.load_optimizer_state(line.optimizer)
            print(f"online: Adam state restored (step {learner.steps})", flush=True)
        learner.set_incumbent(*incumbent_of(registry, line))
        for tp in parts:
            if tp.partition in line.offsets:
                consumer.seek(tp, line.offsets[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
        return line, learner

    line, learner = begin()
    position = {tp.partition: consumer.position(tp) for tp in parts}
    counts: Counter = Counter()
    arrivals: list[int] = []  # Kafka timestamps of the examples learned since the last publication
    last_publish = last_input = time.monotonic()

    def publish() -> bool:
        """Checkpoint; past the gate, register a version (a delta over the root) and promote it. False when the
        line must end (a newer batch model, or the breaker rolled the line back)."""
        nonlocal last_publish
        culprit = registry.tainted(line.parent) if line.parent else None
        if culprit:  # the breaker condemned the line: what it learned since is learned again by the next one
            print(f"online: line {line.line} ends unpublished: {culprit} was rolled back", flush=True)
            arrivals.clear()
            return False
        now_ms = int(time.time() * 1000)
        lag = np.array([now_ms - a for a in arrivals]) / 1000.0 if arrivals else np.zeros(0)
        gate, head = learner.gate(), registry.batch_head()
        version = None
        if gate["passed"] and head == line.line_root:
            meta = {"cadence": "online", **line.describe(),
                    "kafka_offsets": {str(p): o for p, o in position.items()}, "scheme": scheme,
                    "examples": learner.examples, "steps": learner.steps, "counts": dict(counts), "gate": gate,
                    "progressive_ctr_logloss": float(np.nanmean(learner.losses[-50:])) if learner.losses else None,
                    "drift_points": list(learner.drift.drift_points),
                    "freshness_s": {"p50": float(np.percentile(lag, 50)), "p99": float(np.percentile(lag, 99)),
                                    "n": int(len(lag))} if len(lag) else None,
                    "feature_service": {"name": "ranker", "spec": learner.model.spec.fingerprint()},
                    "created_ms": now_ms}
            base = delta_base(registry, line, cfg.online_delta_chain)
            version = save(registry, ScoringModel(learner.model.cpu()), "online", meta, base=base)
            learner.model.to(learner.device)
            registry.promote(version, reason=f"online update after {learner.examples:,} examples: {gate['why']}")
            line.parent = version
            published.append(version)
            learner.promoted_own(version)
        checkpoint.save(line, learner, position)
        report_position(consumer, topic, position)
        print(f"online: {'published and promoted ' + version if version else 'checkpointed, not promoted'} "
              f"({gate.get('why')}); {dict(counts)}", flush=True)
        arrivals.clear()
        last_publish = time.monotonic()
        if head != line.line_root:
            print(f"online: line {line.line} ends: a newer batch model {head} was promoted", flush=True)
            return False
        if registry.promoted() not in (learner.incumbent_version, line.parent):  # promoted by someone else
            learner.set_incumbent(*incumbent_of(registry))
        return True

    try:
        while max_seconds is None or time.monotonic() - began < max_seconds:
            polled = consumer.poll(timeout_ms=500)
            batch: list[tuple[Position, TrainingExample]] = []
            raw: dict[Position, object] = {}
            stamps: list[int] = []
            seen: list[tuple[int, int, int]] = []
            for tp, records in sorted(polled.items(), key=lambda kv: kv[0].partition):
                for record in records:
                    ex = dead.decode(TrainingExample, record)
                    position[tp.partition] = record.offset + 1
                    if ex is None:
                        counts["dead_letters"] += 1
                        continue
                    seen.append((record.partition, record.offset, ex.impression_time_ms))
                    if ex.impression_time_ms < line.skip_until_ms:
                        counts["in_batch_data"] += 1  # the line's root learned this impression
                        continue
                    batch.append(((record.partition, record.offset), ex))
                    raw[(record.partition, record.offset)] = record
                    stamps.append(record.timestamp)
            if seen:
                state.index(seen)
                counts["state_expired"] += state.expire(seen)
            if batch and served is not None:
                served.catch_up()
                logged = {}
                kept = []
                for pos, ex in batch:
                    row = served.get(ex.impression_id)
                    if row is None:
                        counts["unlogged"] += 1
                        if ex.model_version != BASELINE_MODEL_VERSION:
                            r = raw[pos]
                            dead.send(make_dead_letter(r.topic, r.partition, r.offset, "online_trainer",
                                                       f"no prediction log record: impression {ex.impression_id} "
                                                       f"served by {ex.model_version}", r.value, r.timestamp))
                        continue
                    logged[ex.impression_id] = row
                    kept.append((pos, ex))
                batch = kept
            if batch:
                last_input = time.monotonic()
                rows = to_rows(batch, state, scheme, logged if served is not None else None, cancel=True)
                counts.update(rows.counts)
                frame = pd.DataFrame(rows.rows)
                if len(frame):
                    times = frame["impression_time_ms"]
                    lo, hi = int(times.min()), int(times.max())
                    line.learned_range = [min(lo, line.learned_range[0]), max(hi, line.learned_range[1])] \
                        if line.learned_range else [lo, hi]
                for start in range(0, len(frame), cfg.online_batch_size):
                    chunk = frame.iloc[start:start + cfg.online_batch_size]
                    try:
                        learner.learn(encode(chunk, learner.model.spec))
                    except Exception as err:  # noqa: BLE001 - rows that cannot be learned: dead letters, no crash loop
                        reason = f"unlearnable: {type(err).__name__}: {err}"
                        for part, off in dict.fromkeys(zip(chunk["partition"], chunk["offset"], strict=True)):
                            r = raw[(part, off)]
                            dead.send(make_dead_letter(r.topic, r.partition, r.offset, "online_trainer", reason,
                                                       r.value, r.timestamp))
                        counts["unlearnable"] += len(chunk)
                arrivals.extend(stamps)
                last_input = time.monotonic()  # idle means waiting for input, not learning it
            if time.monotonic() - last_publish >= publish_every_s and arrivals and not publish():
                line, learner = begin()
                position = {tp.partition: consumer.position(tp) for tp in parts}
                counts = Counter()
            if idle_exit_s is not None and time.monotonic() - last_input > idle_exit_s:
                break
        if arrivals:
            publish()
    finally:
        consumer.close()
        dead.flush()
        state.close()
        if served is not None:
            served.close()
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
