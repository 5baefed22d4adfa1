"""What the batch cadences share: train, calibrate on held-out rows, measure, register, promote.

Held-out rows are split in two by impression id: calibrators are fitted on one half and the metrics in the
registry's metadata are measured on the other, so a reported ECE is never measured on the rows it was fitted on.
Downsampled negatives count ``1 / sample_rate`` times in both, which is what the undone probabilities estimate.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from infra.settings import Settings
from trainers import preranker
from trainers.calibration import Calibrator
from trainers.data import Batch, encode
from trainers.datasets import holdout_mask
from trainers.metrics import summary
from trainers.model import Ranker
from trainers.registry import Registry, module_bytes
from trainers.retrieval import EXTRA_FILE, TwoTower, clicked_rows, train_two_tower
from trainers.scoring import ScoringModel, reference_of, save
from trainers.train import fit

# The tasks measured on held-out rows and their labels; a frame without a label column (older silver days have no
# negative feedback) leaves that task out.
TASKS = {"ctr": "clicked", "ctcvr": "converted", "neg": "negative_feedback"}
# The tasks with a calibrator. pCVR is a per-click rate, so its calibrator is fitted on the clicked rows with the
# conversion label; pCTCVR then follows as pCTR x pCVR (``trainers.scoring.apply_calibrators``), not as a third map.
CALIBRATED = ("ctr", "cvr", "neg")


def labels(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {task: pd.array(frame[col], dtype="boolean").fillna(False).to_numpy(dtype=np.float64)
            for task, col in TASKS.items() if col in frame}


def row_weights(frame: pd.DataFrame) -> np.ndarray:
    if "sample_rate" not in frame:
        return np.ones(len(frame))
    return 1.0 / frame["sample_rate"].to_numpy(dtype=np.float64)


def task_rows(frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per task, (which rows, their labels, their weights): pCVR over the clicked rows (its label: converted), every
    other task over all rows. Negatives count ``1 / sample_rate`` times (clicks are never downsampled)."""
    y, w = labels(frame), row_weights(frame)
    out = {task: (np.ones(len(frame), dtype=bool), y[task], w) for task in y}
    if "ctr" in y and "ctcvr" in y:
        clicked = y["ctr"] > 0.5
        out["cvr"] = (clicked, y["ctcvr"][clicked], w[clicked])
    return out


ISOTONIC_MIN_POSITIVES = 1_000  # below this, isotonic steps overfit: Platt's two parameters do better


def calibration_half(held: pd.DataFrame) -> np.ndarray:
    """The held-out rows calibrators are fitted on (and early stopping watches); the rest only measure."""
    return holdout_mask(held["impression_id"], 0.5, salt="calibration")


def calibrate(scoring: ScoringModel, held: pd.DataFrame, spec, device: torch.device, method: str = "auto") -> dict:
    """Fit the calibrators (pCTR, pCVR on clicks, pNeg) on half the held-out rows; return metrics (raw and
    calibrated) on the other half, pCTCVR's included.

    ``method`` "auto": isotonic where the fitting rows have ``ISOTONIC_MIN_POSITIVES`` positives, else Platt."""
    if len(held) == 0:
        return {}
    fit_half = calibration_half(held)
    parts = {name: held[mask].reset_index(drop=True) for name, mask in (("fit", fit_half), ("eval", ~fit_half))}
    raw = {name: scoring.uncalibrated(encode(part, spec), device) for name, part in parts.items()}
    rows = {name: task_rows(part) for name, part in parts.items()}
    scoring.calibrators = {}
    for task in CALIBRATED:
        if task not in rows["fit"] or task not in raw["fit"]:  # (a peer without a negative-feedback model)
            continue
        mask, y, w = rows["fit"][task]
        positives = y.sum()
        if positives == 0 or positives == len(y):
            continue
        chosen = method if method != "auto" else "isotonic" if positives >= ISOTONIC_MIN_POSITIVES else "platt"
        scoring.calibrators[task] = Calibrator(chosen).fit(raw["fit"][task][mask], y, w)
    calibrated = scoring.calibrate(raw["eval"])
    metrics: dict[str, dict] = {}
    for task, (mask, y, w) in rows["eval"].items():
        if task in raw["eval"] and len(y):
            metrics[task] = {"raw": summary(y, raw["eval"][task][mask], w),
                             "calibrated": summary(y, calibrated[task][mask], w)}
    return metrics


def train_and_register(model: Ranker, train: Batch, held: pd.DataFrame, *, settings: Settings, cadence: str,
                       data_range: list[str], parent: str | None, negative_rate: float, epochs: int, lr: float,
                       device: torch.device, promote: bool, checkpoint=None,
                       source: str = "training", towers: TwoTower | None = None) -> tuple[str, dict]:
    """Train ``model`` on ``train``, calibrate and measure on ``held``; train candidate retrieval's towers on
    ``train``'s clicks (on from ``towers``, the parent's, when given); register both; promote when asked."""
    cfg = settings.trainer
    validation = encode(held[calibration_half(held)], model.spec) if len(held) else None
    progress = fit(model, train, epochs=epochs, batch_size=cfg.batch_size, lr=lr, device=device,
                   checkpoint=checkpoint, desc=cadence, validation=validation, patience=cfg.early_stopping_patience,
                   wide_lr_scale=cfg.wide_learning_rate_scale,
                   wide_lr_scale_later=cfg.wide_learning_rate_scale_later)
    print(f"{cadence}: {progress.examples:,} examples in {progress.seconds:.1f} s "
          f"({progress.examples / max(progress.seconds, 1e-9):,.0f}/s); loss {progress.loss}", flush=True)
    scoring = ScoringModel(model.cpu(), negative_rate=negative_rate)
    metrics = calibrate(scoring, held, model.spec, torch.device("cpu"))
    for task, m in metrics.items():
        print(f"{cadence}: held-out {task}: AUC {m['calibrated']['auc']:.4f} NE {m['calibrated']['ne']:.4f} "
              f"ECE raw {m['raw']['ece']:.4f} -> calibrated {m['calibrated']['ece']:.4f}", flush=True)
    extra, retrieval, prerank = {}, None, None
    clicks = len(clicked_rows(train))
    if cfg.retrieval_epochs > 0 and clicks >= 2:
        start = towers if towers is not None else TwoTower(model.spec, out_dim=cfg.retrieval_dim)
        towers = train_two_tower(train, model.spec, epochs=cfg.retrieval_epochs, model=start)
        extra[EXTRA_FILE] = module_bytes(towers)
        retrieval = {"config": towers.config, "epochs": cfg.retrieval_epochs, "clicks": clicks}
    if cfg.preranker_epochs > 0:  # the funnel's pre-ranker, distilled from the ranker just trained
        pre = preranker.distil(scoring, train, epochs=cfg.preranker_epochs)
        extra[preranker.EXTRA_FILE] = module_bytes(pre)
        prerank = {"config": pre.config, "epochs": cfg.preranker_epochs,
                   "held_out": preranker.agreement(scoring, pre, encode(held, model.spec)) if len(held) else {}}
        print(f"{cadence}: pre-ranker vs the ranker on held-out rows: {prerank['held_out']}", flush=True)
    registry = Registry(settings.registry_dir)
    meta = {"cadence": cadence, "data_range": data_range, "source": source, "parent": parent, "metrics": metrics,
            "feature_service": {"name": "ranker", "spec": model.spec.fingerprint()},
            "train": {"examples": progress.examples, "seconds": progress.seconds, "epochs": epochs, "lr": lr,
                      "device": str(device), "validation_auc": progress.validation, "best_epoch": progress.best_epoch},
            "created_ms": int(time.time() * 1000),
            "reference": reference_of(scoring, held)}  # the monitor's PSI (the breaker compares with the parent)
    if retrieval:
        meta["retrieval"] = retrieval
    if prerank:
        meta["preranker"] = prerank
    version = save(registry, scoring, cadence, meta, extra=extra)
    print(f"{cadence}: registered {version} in {settings.registry_dir}", flush=True)
    if promote:
        registry.promote(version, reason=f"{cadence} over {data_range[0]}..{data_range[-1]}")
        print(f"{cadence}: promoted {version}", flush=True)
    return version, metrics
