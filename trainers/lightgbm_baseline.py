"""The industrial tabular peer: LightGBM gradient-boosted trees on exactly the ranker's inputs.

It reads the same encoded :class:`trainers.data.Batch` the ranker reads (the hashed id buckets as LightGBM
categorical features, the feature service's dense columns with NaN for missing, and the slot position), so a
comparison with the ranker differs only in the learner. Two boosters, as tabular CTR/CVR stacks usually have:

- CTR on every (negative-downsampled) row; the downsampling is undone exactly, as the ranker's is;
- CVR on the clicked rows (every click is kept by downsampling); pCTCVR = pCTR x pCVR.

Each booster's number of rounds is chosen by ``FOLDS``-fold stratified cross-validation on its training rows
(stopped after ``PATIENCE`` rounds without a better mean log loss, at most ``ROUNDS``), then it is trained on all of
them: the textbook choice with few rows. The CVR booster learns from a few hundred clicks: 300 fixed rounds made
it over-confident (CVR log loss 0.43 against 0.17, features world 11), and stopping on the ranker's validation
rows (about 50 clicks at CI scale) picked anywhere from 10 to 97 rounds, and in one fresh run of features world 11
its CVR AUC with features was 0.51: both peers flattered the ranker.

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
FOLDS = 5


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

    def fit(self, batch: Batch) -> LightGBMBaseline:
        """Train both boosters on ``batch``, each for the number of rounds its cross-validation picks."""
        categorical = list(range(batch.sparse.shape[1]))
        params = {**self.params, "seed": self.seed}
        for task, (x, label) in self._task_rows(batch).items():
            data = lgb.Dataset(x, label=label, categorical_feature=categorical, free_raw_data=False)
            self.boosters[task] = lgb.train(params, data, num_boost_round=self._rounds(params, data, label))
        return self

    def _rounds(self, params: dict, data: lgb.Dataset, label: np.ndarray) -> int:
        """The round count with the best mean held-out-fold log loss (``self.rounds`` if a class has fewer rows
        than folds: nothing to cross-validate)."""
        positives = int(label.sum())
        if min(positives, len(label) - positives) < FOLDS:
            return self.rounds
        curves = lgb.cv(params, data, num_boost_round=self.rounds, nfold=FOLDS, stratified=True, seed=self.seed,
                        callbacks=[lgb.early_stopping(PATIENCE, verbose=False)])
        return len(next(iter(curves.values())))  # cut at the best round by the early stopping

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
