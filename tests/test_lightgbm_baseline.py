"""The LightGBM peer (``trainers.lightgbm_baseline``) picks each booster's rounds by cross-validation: pure logic on
synthetic encoded rows, no services."""

from __future__ import annotations

import numpy as np
import torch

from trainers.data import Batch
from trainers.lightgbm_baseline import FOLDS, ROUNDS, LightGBMBaseline
from trainers.metrics import summary


def synthetic(n: int, seed: int, conversions: int | None = None) -> Batch:
    """CTR depends on the first dense column; CVR (on clicked rows) is a coin flip unless ``conversions`` fixes how
    many clicked rows convert."""
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, 2)).astype(np.float32)
    clicked = rng.random(n) < 1 / (1 + np.exp(-(2.0 * dense[:, 0] - 1.5)))
    converted = clicked & (rng.random(n) < 0.3)
    if conversions is not None:
        converted[:] = False
        converted[np.flatnonzero(clicked)[:conversions]] = True
    return Batch(sparse=torch.from_numpy(rng.integers(1, 50, size=(n, 3))), dense=torch.from_numpy(dense),
                 history=torch.zeros((n, 1), dtype=torch.int64), position=torch.from_numpy(rng.integers(0, 4, n)),
                 label_ctr=torch.from_numpy(clicked.astype(np.float32)),
                 label_ctcvr=torch.from_numpy(converted.astype(np.float32)),
                 label_neg=torch.full((n,), float("nan")), weight=torch.ones(n), clicked=torch.from_numpy(clicked))


def test_cross_validation_stops_a_booster_with_nothing_to_learn_and_keeps_one_with_signal():
    peer = LightGBMBaseline(seed=3).fit(synthetic(6_000, seed=1))
    fresh = synthetic(6_000, seed=2)
    ctr = summary(fresh.label_ctr.numpy(), peer.uncalibrated(fresh)["ctr"])
    assert ctr["auc"] > 0.75, ctr  # the signal is learned
    # The CVR labels are coin flips: every round past the first few only fits noise, and the folds see that.
    assert peer.boosters["cvr"].current_iteration() < ROUNDS / 3, peer.boosters["cvr"].current_iteration()
    assert peer.boosters["cvr"].current_iteration() < peer.boosters["ctr"].current_iteration()


def test_fewer_positives_than_folds_trains_the_fixed_rounds():
    peer = LightGBMBaseline(seed=3, rounds=7).fit(synthetic(3_000, seed=1, conversions=FOLDS - 1))
    assert peer.boosters["cvr"].current_iteration() == 7
