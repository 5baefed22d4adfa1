"""Offline metrics for click and conversion probabilities (numpy and scikit-learn, weights optional).

Labels may be soft (a ``label_ctcvr`` of 0.3): a soft label ``y`` counts as a positive of weight ``y`` and a
negative of weight ``1 - y`` (:func:`expand_soft_labels`), so every metric reads hard and soft labels alike.

>>> y = np.array([0, 0, 1, 1])
>>> p = np.array([0.1, 0.2, 0.7, 0.9])
>>> auc(y, p)
1.0
>>> round(log_loss(y, p), 4)
0.1976
>>> s = summary(y, p)
>>> s["n"], s["rate"]
(4, 0.5)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

EPS = 1e-7


def _arrays(y: ArrayLike, p: ArrayLike, w: ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if not len(y) == len(p) == len(w):
        raise ValueError(f"lengths differ: y {len(y)}, p {len(p)}, w {len(w)}")
    return y, p, w


def expand_soft_labels(
    y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard labels with weights: each row becomes a positive of weight ``w*y`` and a negative of weight ``w*(1-y)``.

    Rows of zero weight are dropped, so hard labels come back as they went in.

    >>> expand_soft_labels([1.0, 0.25], [0.9, 0.4])
    (array([1., 1., 0.]), array([0.9, 0.4, 0.4]), array([1.  , 0.25, 0.75]))
    """
    y, p, w = _arrays(y, p, w)
    if np.any((y < 0) | (y > 1)):
        raise ValueError("labels must lie in [0, 1]")
    labels = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    weights = np.concatenate([w * y, w * (1 - y)])
    keep = weights > 0
    return labels[keep], np.concatenate([p, p])[keep], weights[keep]


def auc(y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN when only one class is present.

    >>> auc([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.6])
    1.0
    >>> auc([1, 1], [0.2, 0.8])
    nan
    """
    y, p, w = expand_soft_labels(y, p, w)
    if not (np.any(y == 1) and np.any(y == 0)):
        return float("nan")
    return float(roc_auc_score(y, p, sample_weight=w))


def log_loss(y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None) -> float:
    """Mean binary cross-entropy, soft labels allowed; ``p`` is clipped to ``[1e-7, 1 - 1e-7]``.

    >>> round(log_loss([1, 0], [0.5, 0.5]), 4)
    0.6931
    >>> round(log_loss([0.5], [0.5]), 4)
    0.6931
    """
    y, p, w = _arrays(y, p, w)
    p = np.clip(p, EPS, 1 - EPS)
    return float(np.average(-(y * np.log(p) + (1 - y) * np.log1p(-p)), weights=w))


def normalized_entropy(y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None) -> float:
    """Log loss divided by the entropy of the base rate ("NE", He et al. 2014): 1 = no better than the rate.

    NaN when the base rate is 0 or 1 (nothing to normalize by).

    >>> round(normalized_entropy([0, 0, 0, 1], [0.25] * 4), 6)
    1.0
    """
    y, p, w = _arrays(y, p, w)
    rate = float(np.average(y, weights=w))
    if rate <= 0 or rate >= 1:
        return float("nan")
    base = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))
    return float(log_loss(y, p, w) / base)


def _bin_index(p: np.ndarray, bins: int, strategy: str) -> np.ndarray:
    """Bin of each prediction: equal-count (``"quantile"``) or equal-width on [0, 1] (``"uniform"``) bins."""
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    elif strategy == "uniform":
        edges = np.linspace(0, 1, bins + 1)
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use 'quantile' or 'uniform'")
    return np.searchsorted(edges[1:-1], p, side="right")


def reliability(
    y: ArrayLike, p: ArrayLike, bins: int = 20, w: ArrayLike | None = None, strategy: str = "quantile"
) -> pd.DataFrame:
    """Reliability table: per bin of ``p``, the mean prediction, the observed rate and the row count.

    Bins hold equal numbers of rows by default (``strategy="quantile"``); empty bins are left out.

    >>> table = reliability([0, 1, 0, 1], [0.1, 0.2, 0.7, 0.9], bins=2)
    >>> table[["p_mean", "rate", "count"]].values.tolist()
    [[0.15000000000000002, 0.5, 2.0], [0.8, 0.5, 2.0]]
    """
    y, p, w = _arrays(y, p, w)
    index = _bin_index(p, bins, strategy)
    n = index.max() + 1 if len(index) else 0
    weight = np.bincount(index, weights=w, minlength=n)
    count = np.bincount(index, minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_mean = np.bincount(index, weights=w * p, minlength=n) / weight
        rate = np.bincount(index, weights=w * y, minlength=n) / weight
    table = pd.DataFrame({"p_mean": p_mean, "rate": rate, "count": count, "weight": weight})
    return table[table["weight"] > 0].reset_index(drop=True)


def ece(
    y: ArrayLike, p: ArrayLike, bins: int = 20, w: ArrayLike | None = None, strategy: str = "quantile"
) -> float:
    """Expected calibration error: the weight-averaged ``|observed rate - mean p|`` over bins of ``p``.

    Bins are equal-count (quantile) bins by default, which suits the skewed predictions of CTR models;
    ``strategy="uniform"`` uses equal-width bins on [0, 1].

    >>> ece([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    0.0
    """
    table = reliability(y, p, bins=bins, w=w, strategy=strategy)
    if table.empty:
        return float("nan")
    return float(np.average(np.abs(table["rate"] - table["p_mean"]), weights=table["weight"]))


def summary(y: ArrayLike, p: ArrayLike, w: ArrayLike | None = None) -> dict[str, float]:
    """The usual report: ``auc``, ``nll`` (log loss), ``ne``, ``ece``, ``mean_p``, ``rate`` and ``n`` (rows).

    >>> sorted(summary([0, 1], [0.4, 0.6]))
    ['auc', 'ece', 'mean_p', 'n', 'ne', 'nll', 'rate']
    """
    y, p, w = _arrays(y, p, w)
    return {
        "auc": auc(y, p, w),
        "nll": log_loss(y, p, w),
        "ne": normalized_entropy(y, p, w),
        "ece": ece(y, p, w=w),
        "mean_p": float(np.average(p, weights=w)),
        "rate": float(np.average(y, weights=w)),
        "n": len(y),
    }
