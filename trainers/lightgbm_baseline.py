"""The industrial tabular peer: LightGBM gradient-boosted trees on exactly the ranker's inputs.

It reads the same encoded :class:`trainers.data.Batch` the ranker reads (the hashed id buckets as LightGBM
categorical features, the feature service's dense columns with NaN for missing, and the slot position), so a
comparison with the ranker differs only in the learner. Two boosters, as tabular CTR/CVR stacks usually have:

- CTR on every (negative-downsampled) row; the downsampling is undone exactly, as the ranker's is;
- CVR on the clicked rows (every click is kept by downsampling); pCTCVR = pCTR x pCVR.

Each booster stops early (``PATIENCE`` rounds without a better log loss, the best round kept) on the validation
rows the ranker's own early stopping watches: the CVR booster learns from a few hundred clicks, and 300 fixed
rounds made it over-confident (CVR log loss 0.43 against 0.17 with early stopping, features world 11), a peer
that flattered the ranker.

Scoring fixes the position to ``DEFAULT_POSITION`` as serving does. :meth:`uncalibrated`, :meth:`calibrate` and
``calibrators`` follow :class:`trainers.scoring.ScoringModel`, so :func:`trainers.cadence.calibrate` fits its
post-hoc calibrators by the same rules as the ranker's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import torch

from trainers.calibration import Calibrator, undo_downsampling
from trainers.data import DEFAULT_POSITION, Batch
from trainers.scoring import apply_calibrators

PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 63,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    # High-cardinality ids (users, ads): LightGBM's own remedies for overfitting categorical splits.
    "max_cat_threshold": 64,
    "cat_smooth": 20.0,
    "cat_l2": 10.0,
    "min_data_per_group": 50,
    "verbose": -1,
    "num_threads": 1,
    "deterministic": True,
}
ROUNDS = 300  # at most
PATIENCE = 30


def features(batch: Batch, position: bool) -> np.ndarray:
    """``[sparse buckets | dense | position]`` as one float matrix (NaN = missing, as LightGBM expects)."""
    pos = batch.position.numpy() if position else np.full(len(batch), DEFAULT_POSITION)
    return np.column_stack([batch.sparse.numpy().astype(np.float64), batch.dense.numpy().astype(np.float64),
                            pos.astype(np.float64)])


@dataclass
class LightGBMBaseline:
    """``fit`` on encoded training rows, then score like a :class:`trainers.scoring.ScoringModel`."""

    negative_rate: float = 1.0
    rounds: int = ROUNDS
    seed: int = 0
    params: dict = field(default_factory=lambda: dict(PARAMS))
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)

    def fit(self, batch: Batch, validation: Batch | None = None) -> LightGBMBaseline:
        """Train both boosters on ``batch``; with ``validation``, each stops early on its rows (where they hold
        both labels of its task), else runs every round."""
        categorical = list(range(batch.sparse.shape[1]))
        params = {**self.params, "seed": self.seed}
        for task, (x, label) in self._task_rows(batch).items():
            data = lgb.Dataset(x, label=label, categorical_feature=categorical, free_raw_data=True)
            kwargs = {}
            if validation is not None:
                vx, vlabel = self._task_rows(validation)[task]
                if 0 < vlabel.sum() < len(vlabel):
                    kwargs = {"valid_sets": [lgb.Dataset(vx, label=vlabel, categorical_feature=categorical,
                                                         reference=data)],
                              "callbacks": [lgb.early_stopping(PATIENCE, verbose=False)]}
            self.boosters[task] = lgb.train(params, data, num_boost_round=self.rounds, **kwargs)
        return self

    @staticmethod
    def _task_rows(batch: Batch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per booster, its (inputs, labels): CTR on every row, CVR on the clicked rows."""
        x, clicked = features(batch, position=True), batch.label_ctr.numpy() > 0.5
        return {"ctr": (x, batch.label_ctr.numpy()), "cvr": (x[clicked], batch.label_ctcvr.numpy()[clicked])}

    def uncalibrated(self, batch: Batch, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        x = features(batch, position=False)
        ctr = undo_downsampling(self.boosters["ctr"].predict(x), self.negative_rate)
        cvr = np.asarray(self.boosters["cvr"].predict(x), dtype=np.float64)
        return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr}

    def calibrate(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return apply_calibrators(self.calibrators, out)

    def score(self, batch: Batch, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        return self.calibrate(self.uncalibrated(batch, device))
