"""A trained ranker as serving uses it: raw outputs -> downsampling undone -> delay bias undone -> calibrated.

``ScoringModel.score`` turns a :class:`Batch` into calibrated pCTR, pCVR and pCTCVR:

1. the network's outputs at the default position (no position bias at scoring);
2. pCTR with negative downsampling undone exactly, ``p / (p + (1 - p) / w)`` (w: the negatives' keep rate);
   pCVR is a per-click rate, untouched by downsampling non-clicks, so pCTCVR = pCTR x pCVR stays exact;
3. post-hoc calibrators (fitted on held-out rows) for CTR, CVR (on the clicked rows) and negative feedback;
   pCTCVR = pCTR x pCVR. (Versions registered before pCVR had its own calibrator carry a CTCVR one instead and
   serve pCVR as calibrated pCTCVR / calibrated pCTR, as they did.)

``save``/``load`` write and read it through the registry: weights as safetensors, the network's config,
calibrators and the rest as JSON metadata (nothing is unpickled). ``reference_of`` gives a model's score
distribution on its held-out rows, which the cadences store in ``meta["reference"]`` (the monitor's training
reference, ``batch_jobs.monitor``; the circuit breaker compares with what the parent served instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from trainers.calibration import Calibrator, undo_downsampling
from trainers.data import Batch, encode
from trainers.model import Ranker, model_from_config
from trainers.registry import Registry
from trainers.train import predict

EPS = 1e-6


@dataclass
class ScoringModel:
    model: Ranker
    negative_rate: float = 1.0  # keep rate of the negatives the network was trained on
    fnw: bool = False  # trained on fake-negative-weighted conversion labels (metadata only)
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    version: str | None = None
    meta: dict = field(default_factory=dict)

    def uncalibrated(self, data: Batch, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        raw = predict(self.model, data, torch.device(device))
        ctr = undo_downsampling(raw["ctr"].astype(np.float64), self.negative_rate)
        # FNW's importance weights (trainers/loss.py) already make the learned pCVR unbiased.
        cvr = raw["cvr"].astype(np.float64)
        return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr, "neg": raw["neg"].astype(np.float64)}

    def score(self, data: Batch, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
        """Calibrated probabilities of every row."""
        out = self.uncalibrated(data, device)
        return self.calibrate(out)

    def calibrate(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return apply_calibrators(self.calibrators, out)


def apply_calibrators(calibrators: dict, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each task through its calibrator (where fitted); pCTCVR follows as pCTR x pCVR.

    A version with a CTCVR calibrator (registered before pCVR had its own) keeps its ratio: pCVR = pCTCVR / pCTR."""
    out = dict(out)
    for task in ("ctr", "cvr", "ctcvr", "neg"):
        if task in calibrators:
            out[task] = np.clip(calibrators[task].transform(out[task]), EPS, 1 - EPS)
    if "ctcvr" in calibrators:
        out["ctcvr"] = np.minimum(out["ctcvr"], out["ctr"])
        out["cvr"] = out["ctcvr"] / np.maximum(out["ctr"], EPS)
    else:
        out["ctcvr"] = out["ctr"] * out["cvr"]
    return out


def reference_of(scoring: ScoringModel, frame: pd.DataFrame) -> dict:
    """The model's calibrated pCTR / pCVR distribution and per-task rates on ``frame``, negatives weighted by
    ``1 / sample_rate`` (see :func:`trainers.circuit_breaker.reference_distribution`)."""
    from trainers.circuit_breaker import reference_distribution

    scores = scoring.score(encode(frame, scoring.model.spec))
    weights = 1.0 / frame["sample_rate"].to_numpy(dtype=np.float64) if "sample_rate" in frame else None
    labels = {c: frame[c].fillna(False).to_numpy(dtype=np.float64) if c in frame else np.zeros(len(frame))
              for c in ("clicked", "converted")}
    return reference_distribution(scores, labels["clicked"], labels["converted"], weights)


def save(registry: Registry, scoring: ScoringModel, cadence: str, meta: dict, base: str | None = None,
         extra: dict[str, bytes] | None = None) -> str:
    """Register the model (weights + config + calibrators, ``extra`` files beside them); returns the new version.
    With ``base``, stored as a delta over that version (``Registry.register``)."""
    full = {**meta, "model_config": scoring.model.config, "negative_rate": scoring.negative_rate,
            "fnw": scoring.fnw, "calibrators": {k: c.to_json() for k, c in scoring.calibrators.items()}}
    state = {k: v.detach().cpu().contiguous() for k, v in scoring.model.state_dict().items()}
    json.dumps(full)  # fail here, before anything is written, if the metadata is not JSON
    return registry.register(state, full, cadence=cadence, base=base, extra=extra)


def from_registry(state: dict[str, torch.Tensor], meta: dict, version: str) -> ScoringModel:
    model = model_from_config(meta["model_config"])
    model.load_state_dict(state, strict=True)
    model.eval()
    calibrators = {k: Calibrator.from_json(v) for k, v in meta.get("calibrators", {}).items()}
    return ScoringModel(model, meta.get("negative_rate", 1.0), meta.get("fnw", False), calibrators, version, meta)


def load(registry: Registry, version: str | None = None) -> ScoringModel:
    """A given version, or the promoted one (falling back to the previous promoted one if it is corrupt)."""
    if version is None:
        version, state, meta = registry.load_promoted()
    else:
        state, meta = registry.load(version)
    return from_registry(state, meta, version)
