"""Calibration: undo negative downsampling, fit post-hoc calibrators, draw reliability plots.

A :class:`Calibrator` is fitted on held-out predictions and stored as plain JSON (no pickle), so a model
registry can keep it next to the weights and reload it anywhere.

>>> rng = np.random.default_rng(0)
>>> p_true = rng.beta(1, 20, 50_000)
>>> y = rng.random(50_000) < p_true
>>> raw = np.sqrt(p_true)  # an over-confident model
>>> cal = Calibrator("isotonic").fit(raw, y)
>>> ece(y, cal.transform(raw)) < ece(y, raw)
True
>>> Calibrator.from_json(cal.to_json()).method
'isotonic'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from trainers.metrics import ece, expand_soft_labels, reliability

P_MIN, P_MAX = 1e-6, 1 - 1e-6  # calibrated outputs stay inside, so log loss stays finite
METHODS = ("isotonic", "platt")
PLATT_MIN_POSITIVES = 50  # fewer positives: Platt's slope is noise (it can come out negative), fit the offset only


def undo_downsampling(p: ArrayLike, sample_rate: float) -> np.ndarray | float:
    """The probability on the full stream of a model trained with negatives kept at rate ``w = sample_rate``.

    Training on a set where each negative was kept with probability ``w`` inflates the odds by ``1 / w``:
    every kept negative stands for ``1 / w`` negatives of the real stream. Deflating the odds back gives
    ``q = p / (p + (1 - p) / w)``; ``w = 1`` (nothing dropped) leaves ``p`` unchanged.

    >>> round(undo_downsampling(0.5, 0.1), 6)
    0.090909
    >>> undo_downsampling(np.array([0.2, 0.5]), 1.0).tolist()
    [0.2, 0.5]
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    p = np.asarray(p, dtype=np.float64)
    q = p / (p + (1 - p) / sample_rate)
    return float(q) if q.ndim == 0 else q


def offset_only(z: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """The offset ``b`` for which the weighted mean of ``sigmoid(z + b)`` equals the weighted rate of ``labels``
    (the logistic fit with the slope held at 1); the rate is kept inside ``[P_MIN, P_MAX]``.

    >>> round(offset_only(np.zeros(4), np.array([1, 0, 0, 0]), np.ones(4)), 4)  # logit(0.25)
    -1.0986
    """
    rate = float(np.clip(np.average(labels, weights=weights), P_MIN, P_MAX))
    return float(brentq(lambda b: float(np.average(expit(z + b), weights=weights)) - rate, -50.0, 50.0))


class Calibrator:
    """Post-hoc calibration of probabilities, fitted on held-out data.

    - ``"isotonic"``: a monotone step-wise map (``sklearn.isotonic.IsotonicRegression``, increasing),
      stored as its thresholds and applied by linear interpolation, clipped outside them (as
      ``out_of_bounds="clip"`` does);
    - ``"platt"``: ``sigmoid(a * logit(p) + b)``, fitted by unpenalized ``sklearn`` logistic regression. A
      calibrator must never reorder what it calibrates (the auction ranks by its output): with fewer than
      ``PLATT_MIN_POSITIVES`` positives, or when the fitted slope is not positive, the slope stays 1 and only the
      offset ``b`` is fitted (so the mean prediction matches the observed rate).

    Outputs are clipped to ``[1e-6, 1 - 1e-6]``. Soft labels are accepted (see ``expand_soft_labels``).

    >>> cal = Calibrator("platt").fit([0.1, 0.2, 0.8, 0.9], [0, 1, 0, 1])
    >>> round(float(cal.transform([0.5])[0]), 3)
    0.5
    >>> sorted(cal.to_json())
    ['a', 'b', 'method']
    """

    def __init__(self, method: str = "isotonic") -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
        self.method = method
        self.x: np.ndarray | None = None  # isotonic thresholds
        self.y: np.ndarray | None = None
        self.a: float | None = None  # platt slope and intercept on the logit
        self.b: float | None = None

    def fit(self, p: ArrayLike, y: ArrayLike, w: ArrayLike | None = None) -> Calibrator:
        """Fit on held-out predictions ``p`` and labels ``y`` (hard or soft), weights optional."""
        labels, p, weights = expand_soft_labels(y, p, w)
        if self.method == "isotonic":
            iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
            iso.fit(p, labels, sample_weight=weights)
            self.x, self.y = iso.X_thresholds_.astype(np.float64), iso.y_thresholds_.astype(np.float64)
        else:
            z = logit(np.clip(p, P_MIN, P_MAX))
            self.a, self.b = 1.0, offset_only(z, labels, weights)
            if int((labels > 0.5).sum()) >= PLATT_MIN_POSITIVES:
                lr = LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), labels, sample_weight=weights)
                if lr.coef_[0, 0] > 0:
                    self.a, self.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        return self

    @property
    def fitted(self) -> bool:
        return self.x is not None or self.a is not None

    def transform(self, p: ArrayLike) -> np.ndarray:
        """Calibrated probabilities of ``p``."""
        if not self.fitted:
            raise RuntimeError("Calibrator is not fitted")
        p = np.asarray(p, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(p, self.x, self.y)
        else:
            out = expit(self.a * logit(np.clip(p, P_MIN, P_MAX)) + self.b)
        return np.clip(out, P_MIN, P_MAX)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"method", "x", "y"}`` (isotonic) or ``{"method", "a", "b"}`` (platt)."""
        if not self.fitted:
            raise RuntimeError("Calibrator is not fitted")
        if self.method == "isotonic":
            return {"method": self.method, "x": self.x.tolist(), "y": self.y.tolist()}
        return {"method": self.method, "a": self.a, "b": self.b}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibrator:
        """The calibrator that :meth:`to_json` wrote."""
        cal = cls(data["method"])
        if cal.method == "isotonic":
            cal.x = np.asarray(data["x"], dtype=np.float64)
            cal.y = np.asarray(data["y"], dtype=np.float64)
        else:
            cal.a, cal.b = float(data["a"]), float(data["b"])
        return cal

    def __repr__(self) -> str:
        return f"Calibrator(method={self.method!r}, fitted={self.fitted})"


def fit_task_calibrators(
    preds: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    method: str = "isotonic",
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, Calibrator]:
    """One calibrator per task (``"ctr"``, ``"ctcvr"``, ...) present in both ``preds`` and ``labels``.

    >>> cals = fit_task_calibrators({"ctr": np.array([0.1, 0.9])}, {"ctr": np.array([0, 1])}, method="platt")
    >>> list(cals)
    ['ctr']
    """
    weights = weights or {}
    return {
        task: Calibrator(method).fit(preds[task], labels[task], weights.get(task))
        for task in preds
        if task in labels
    }


def reliability_plot(
    results: dict[str, tuple[ArrayLike, ArrayLike]], path: Path, title: str, bins: int = 20
) -> Path:
    """Reliability curves (one per entry, e.g. ``"raw"``, ``"calibrated"``) over the diagonal, and a histogram
    of the predictions below them; saved as a PNG at ``path``, which is returned."""
    fig = Figure(figsize=(6, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top = 0.0
    for name, (y, p) in results.items():
        table = reliability(y, p, bins=bins)
        top = max(top, float(np.quantile(p, 0.999)), float(table["rate"].max()))
        ax.plot(table["p_mean"], table["rate"], marker="o", markersize=3, label=f"{name} (ECE {ece(y, p):.4f})")
        hist.hist(np.asarray(p, dtype=np.float64), bins=50, histtype="step", label=name)
    top = min(1.0, 1.05 * top) if top > 0 else 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set(xlim=(0, top), ylim=(0, top), ylabel="observed rate (per bin of p)", title=title)
    ax.legend(loc="upper left", fontsize="small")
    hist.set(xlabel="predicted probability", ylabel="rows", yscale="log")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
