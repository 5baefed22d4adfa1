"""The streaming yardstick: online logistic regression (River) over hashed one-hot ids, one model per task.

Each impression is predicted before it is learned (progressive validation), so ``metrics()`` is an honest
out-of-sample score of the stream so far, and the per-example CTR log loss feeds an ADWIN drift detector.

>>> model = RiverBaseline()
>>> row = {"user_id": 7, "ad_id": 42, "placement": "feed", "device": "ios", "position": 1}
>>> for _ in range(50):
...     model.learn_one(row, label_ctr=1.0, label_ctcvr=0.0)
>>> p = model.predict_one(row)
>>> p["ctr"] > 0.5 > p["ctcvr"]
True
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Sequence

import pandas as pd
from river import drift, linear_model, metrics, optim, preprocessing

TASKS = ("ctr", "ctcvr")
ID_FIELDS = ("user_id", "ad_id", "advertiser_id", "campaign_id", "category_id", "placement", "device", "position")
CROSSES = (("ad_id", "placement"),)
LABEL_COLUMNS = {"ctr": ("label_ctr", "clicked"), "ctcvr": ("label_ctcvr", "converted")}
P_MIN = 1e-7
FLUSH_EVERY = 10_000


def one_hot_tokens(row: dict, id_fields: Sequence[str], crosses: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """The categorical part of a row: ``{field: token}`` for each present id, plus crosses ``a_x_b: "va|vb"``.

    River's ``FeatureHasher`` turns each string value into a one-hot ``"field=token"`` bucket.

    >>> one_hot_tokens({"ad_id": 3.0, "placement": "feed", "device": None}, ID_FIELDS, CROSSES)
    {'ad_id': '3', 'placement': 'feed', 'ad_id_x_placement': '3|feed'}
    """
    out = {}
    for field in id_fields:
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, float):
            if math.isnan(value):
                continue
            if value.is_integer():
                value = int(value)
        out[field] = value if isinstance(value, str) else str(value)
    for cross in crosses:
        parts = [out.get(field) for field in cross]
        if all(part is not None for part in parts):
            out["_x_".join(cross)] = "|".join(parts)
    return out


def numeric_features(row: dict, columns: Sequence[str] | None) -> dict[str, float]:
    """The finite numeric values of ``columns`` (by default every ``<view>__<feature>`` column); bools and
    missing values are left out, so the scaler's statistics only see real values (missing -> mean, i.e. 0).

    >>> numeric_features({"ad_features__ad_ctr_7d": 0.1, "bid": 2.0, "u__x": float("nan")}, None)
    {'ad_features__ad_ctr_7d': 0.1}
    """
    names = [k for k in row if "__" in k] if columns is None else columns
    out = {}
    for name in names:
        value = row.get(name)
        kind = type(value)
        if kind is float or kind is int or (kind is not bool and isinstance(value, numbers.Real)):
            value = float(value)
            if math.isfinite(value):
                out[name] = value
    return out


def soft_log_loss(y: float, p: float) -> float:
    """Binary cross-entropy of one prediction, soft label allowed.

    >>> round(soft_log_loss(0.5, 0.5), 4)
    0.6931
    """
    p = min(max(p, P_MIN), 1 - P_MIN)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _split_soft(y: float, weight: float) -> list[tuple[bool, float]]:
    """A label in [0, 1] as weighted hard labels: ``y`` -> (True, w*y) and (False, w*(1-y)), zero weights dropped."""
    return [(label, w) for label, w in ((True, weight * y), (False, weight * (1 - y))) if w > 0]


class LossDriftMonitor:
    """ADWIN (``river.drift.ADWIN``) on a stream of per-example losses; flags when the loss *rose*.

    ADWIN flags any change of the mean. While a model is still learning its loss falls, which is not a
    problem, so by default (``direction="up"``) a change only counts when the mean of the recent window
    ADWIN keeps is above the mean before the change. ``drift_points`` holds the (0-based) indices of the
    updates that flagged a drift.

    >>> import random
    >>> rng = random.Random(0)
    >>> monitor = LossDriftMonitor()
    >>> flagged = [monitor.update(rng.random() * (1 if i < 3000 else 3)) for i in range(6000)]
    >>> len(monitor.drift_points) >= 1 and 3000 <= monitor.drift_points[0] < 3500
    True
    """

    def __init__(self, delta: float = 0.002, clock: int = 32, grace_period: int = 100, direction: str = "up"):
        if direction not in ("up", "any"):
            raise ValueError(f"direction must be 'up' or 'any', got {direction!r}")
        self.direction = direction
        self.adwin = drift.ADWIN(delta=delta, clock=clock, grace_period=grace_period)
        self._recent: deque[float] = deque(maxlen=grace_period)
        self._recent_sum = 0.0
        self.drift_points: list[int] = []
        self.n = 0

    def update(self, loss: float) -> bool:
        """Add one loss; ``True`` when this update flags a drift (the index goes to ``drift_points``).

        The direction compares the mean of the last ``grace_period`` losses with ADWIN's window just before the
        cut. ADWIN cuts at bucket edges and may fire a few dozen losses into a change, keeping mostly older
        losses: its estimate just before and after the cut, or its two sub-windows, can then point the wrong way
        (and it may not fire again)."""
        before = self.adwin.estimation
        if len(self._recent) == self._recent.maxlen:
            self._recent_sum -= self._recent[0]
        self._recent.append(loss)
        self._recent_sum += loss
        self.adwin.update(loss)
        flagged = self.adwin.drift_detected and (
            self.direction == "any" or self._recent_sum / len(self._recent) > before)
        if flagged:
            self.drift_points.append(self.n)
        self.n += 1
        return flagged

    @property
    def mean(self) -> float:
        """Mean loss over ADWIN's current window."""
        return self.adwin.estimation


class RiverBaseline:
    """Online logistic regression per task (``"ctr"``: clicked, ``"ctcvr"``: converted) on hashed one-hot ids.

    Features: one-hot ids (``ID_FIELDS``) and crosses (``ad_id x placement``) hashed into ``n_features``
    buckets by ``river.preprocessing.FeatureHasher``, next to the numeric features (``numeric``; by default
    every ``<view>__<feature>`` column) scaled by a running ``river.preprocessing.StandardScaler``. Both tasks
    share the features, which are computed once per row.

    Optimizer: FTRL-Proximal (McMahan et al. 2013) rather than plain SGD. Its learning rate is per coordinate
    (``alpha / (beta + sqrt(sum of squared gradients))``), so a rare ad or user id still takes large steps on
    its few examples while frequent ones (placement, device) settle; one global SGD rate is either too slow
    for the rare ids or too noisy for the frequent ones (on the synthetic stream of the tests FTRL reaches a
    higher progressive AUC and lower log loss than SGD at any of 0.01, 0.05, 0.1). ``l1`` makes it sparse.

    Soft labels: River's ``LogisticRegression.learn_one(x, y, w)`` takes a bool label and a sample weight, so
    a label ``y`` in (0, 1) is learned as a positive of weight ``w*y`` then a negative of weight ``w*(1-y)``:
    together the soft log-loss gradient, up to the small move between the two steps (and FTRL's per-coordinate
    step sizes then see two gradients, not their sum, so they shrink a little faster). Hard labels take one.

    Progressive validation: ``learn_one`` predicts first, then updates per task ``river.metrics.LogLoss``
    (weighted, soft labels exact) and ``river.metrics.RollingROCAUC`` (exact AUC over the last ``auc_window``
    predictions, i.e. over all of them until then; it takes no weights and reads a soft label as ``y >= 0.5``).
    ``metrics.ROCAUC`` is not used: it thresholds ``p`` at evenly spaced points of [0, 1], which for CTR-sized
    probabilities lands nearly all predictions below the first cut (0.65 for a true 0.73 with 10 thresholds)
    and costs ~0.7 us per threshold per update. The (unweighted) CTR log loss then feeds a :class:`LossDriftMonitor`
    (ADWIN); ``drift_points`` are the example indices where it flagged a rise. Rows with a NaN label are not
    learned (nor scored) for that task.

    Speed: ``learn_one`` (features, both predictions, metrics, drift monitor and both FTRL steps) on a row
    of 20 features (8 ids + 1 cross + 11 numerics) ran at 7-8.5k rows/s of CPU time on this project's
    machine (~120-140 us a row; about half of it is River's pure-Python FTRL step; wall clock was 3-5k rows/s
    while the 2-core machine was shared with other work); ``predict_one`` ~35k rows/s.
    """

    def __init__(
        self,
        numeric: Sequence[str] | None = None,
        id_fields: Sequence[str] = ID_FIELDS,
        crosses: Sequence[tuple[str, ...]] = CROSSES,
        n_features: int = 2**20,
        alpha: float = 0.1,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 1.0,
        intercept_lr: float = 0.01,
        auc_window: int = 100_000,
        drift_delta: float = 0.002,
        seed: int = 0,
    ) -> None:
        self.numeric = None if numeric is None else tuple(numeric)
        self.id_fields = tuple(id_fields)
        self.crosses = tuple(tuple(c) for c in crosses)
        self.hasher = preprocessing.FeatureHasher(n_features=n_features, seed=seed, alternate_sign=False)
        self.scaler = preprocessing.StandardScaler()
        self.models = {
            task: linear_model.LogisticRegression(
                optimizer=optim.FTRLProximal(alpha=alpha, beta=beta, l1=l1, l2=l2), intercept_lr=intercept_lr
            )
            for task in TASKS
        }
        self.logloss = {task: metrics.LogLoss() for task in TASKS}
        self.rocauc = {task: metrics.RollingROCAUC(window_size=auc_window) for task in TASKS}
        self.monitor = LossDriftMonitor(delta=drift_delta)
        self.n_seen = 0
        self.last_prediction: dict[str, float] | None = None  # the progressive prediction of the last learned row

    def features(self, row: dict) -> tuple[dict, dict[str, float]]:
        """The model's input for ``row`` (hashed one-hot buckets and scaled numerics), and the raw numerics."""
        numeric = numeric_features(row, self.numeric)
        x = self.hasher.transform_one(one_hot_tokens(row, self.id_fields, self.crosses))
        x.update(self.scaler.transform_one(numeric))
        return x, numeric

    @property
    def drift_points(self) -> list[int]:
        """Example indices (0-based, in learning order) where ADWIN flagged a rise of the CTR log loss."""
        return self.monitor.drift_points

    @property
    def drifts(self) -> int:
        """How many drifts were flagged."""
        return len(self.monitor.drift_points)

    def _predict_x(self, x: dict) -> dict[str, float]:
        out = {}
        for task, model in self.models.items():
            p = model.predict_proba_one(x)[True]
            out[task] = min(max(p, P_MIN), 1 - P_MIN)
        return out

    def predict_one(self, row: dict) -> dict[str, float]:
        """``{"ctr": p, "ctcvr": p}`` for one row, each in (0, 1)."""
        return self._predict_x(self.features(row)[0])

    def learn_one(self, row: dict, label_ctr: float, label_ctcvr: float, weight: float = 1.0) -> None:
        """Predict ``row`` (scored into the metrics and the drift monitor; kept as ``last_prediction``), then
        learn it."""
        labels = {"ctr": float(label_ctr), "ctcvr": float(label_ctcvr)}
        for task, y in labels.items():
            if not (math.isnan(y) or 0.0 <= y <= 1.0):
                raise ValueError(f"{task} label must lie in [0, 1] (or be NaN), got {y}")
        x, numeric = self.features(row)
        preds = self._predict_x(x)
        for task, y in labels.items():
            if math.isnan(y):
                continue
            self.rocauc[task].update(y >= 0.5, preds[task])
            for label, w in _split_soft(y, weight):
                self.logloss[task].update(label, preds[task], w)
                self.models[task].learn_one(x, label, w)
            if task == "ctr":
                self.monitor.update(soft_log_loss(y, preds[task]))
        self.scaler.learn_one(numeric)
        self.n_seen += 1
        if self.n_seen % FLUSH_EVERY == 0:
            for metric in self.rocauc.values():
                metric.get()  # get() flushes RollingROCAUC's buffer of updates, keeping its memory bounded
        self.last_prediction = preds

    def metrics(self) -> dict[str, float]:
        """Progressive-validation scores so far: ``<task>_logloss``, ``<task>_auc``, plus ``n`` and ``drifts``."""
        out: dict[str, float] = {}
        for task in TASKS:
            out[f"{task}_logloss"] = self.logloss[task].get()
            out[f"{task}_auc"] = self.rocauc[task].get()
        out["n"] = self.n_seen
        out["drifts"] = self.drifts
        return out

    def learn_many(self, frame: pd.DataFrame) -> None:
        """``learn_one`` over the rows in order; labels from ``label_ctr``/``label_ctcvr`` (soft) or else
        ``clicked``/``converted``, weights from ``weight`` when present."""
        labels = {task: _labels(frame, *LABEL_COLUMNS[task]) for task in TASKS}
        weights = frame["weight"].astype(float).tolist() if "weight" in frame else [1.0] * len(frame)
        rows = frame.to_dict("records")
        for row, y_ctr, y_ctcvr, w in zip(rows, labels["ctr"], labels["ctcvr"], weights, strict=True):
            self.learn_one(row, y_ctr, y_ctcvr, w)

    def predict_many(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Columns ``ctr`` and ``ctcvr``, one row per row of ``frame`` (same index)."""
        preds = [self.predict_one(row) for row in frame.to_dict("records")]
        return pd.DataFrame(preds, index=frame.index, columns=list(TASKS), dtype=float)


def _labels(frame: pd.DataFrame, soft: str, hard: str) -> list[float]:
    if soft in frame:
        return frame[soft].astype(float).tolist()
    if hard in frame:
        return frame[hard].fillna(False).astype(float).tolist()
    raise KeyError(f"frame has neither {soft!r} nor {hard!r}")
