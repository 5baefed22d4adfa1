"""What the ranker reads: the input spec (from ``schemas/features.py``), and frames encoded into tensors.

A row is an impression (or a training example) with its ids, its context and its features as of the
impression's time, columns named as the training-set builder names them (``<view>__<feature>``). Every
source (training-set partitions, the joiner's examples with features from the online store, simulated
frames) is turned into the same :class:`Batch`:

- ``sparse``: one hashed bucket per id field (``SPARSE_FIELDS``); bucket 0 is padding, never an id;
- ``dense``: the feature service's scalar features, counts and ages as ``log1p``, rates as they are; NaN
  where a feature is missing (the model normalizes and fills it);
- ``history``: the user's recent ads (newest first), hashed like ``ad_id``, 0-padded to ``RECENT_ADS``;
- ``position``: the slot, a separate bias in training and fixed to ``DEFAULT_POSITION`` when scoring;
- labels: ``label_ctr`` (click), ``label_ctcvr`` (click and conversion, may be soft), ``label_neg``
  (negative feedback: the examples' ``label_neg`` or silver's ``negative_feedback``; NaN where the source has none,
  which masks it) and per-row ``weight``.

>>> spec = InputSpec.from_schemas()
>>> spec.sparse_fields[:3], len(spec.dense_columns) > 20
(('user_id', 'ad_id', 'advertiser_id'), True)
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
import torch

from schemas.features import GOLD_TABLES, N_CATEGORIES, REALTIME_TABLES, RECENT_ADS, AdFeatures, UserRealtime

SPARSE_FIELDS = ("user_id", "ad_id", "advertiser_id", "campaign_id", "category_id", "placement", "device")
LARGE_FIELDS = frozenset({"user_id", "ad_id", "advertiser_id", "campaign_id"})
MAX_POSITION = 15
DEFAULT_POSITION = 0  # the position scored at serving time (the bias of the top slot)
HISTORY_COLUMN = f"{UserRealtime.VIEW}__user_recent_ad_ids"
CATEGORY_FROM_FEATURES = f"{AdFeatures.VIEW}__ad_category_id"
PROFILE_COLUMN = "user_features__user_category_profile"
AFFINITY = "user_category_affinity"  # the user's profile share in the candidate ad's category (derived)
_SALT = {name: i + 1 for i, name in enumerate(SPARSE_FIELDS)}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _is_log_scaled(name: str) -> bool:
    """Counts and ages are log-scaled; rates and shares are kept as they are."""
    return not any(part in name for part in ("_ctr", "_cvr", "affinity"))


@dataclass(frozen=True)
class InputSpec:
    """The model's inputs: id fields with their bucket counts, dense columns (log-scaled or not)."""

    sparse_fields: tuple[str, ...]
    buckets: tuple[int, ...]
    dense_columns: tuple[str, ...]
    log_scaled: tuple[bool, ...]
    history_len: int = RECENT_ADS

    @classmethod
    def from_schemas(cls, id_buckets: int = 200_003, small_buckets: int = 1_009) -> InputSpec:
        dense: list[str] = []
        for table in GOLD_TABLES + REALTIME_TABLES:
            for name, info in table.model_fields.items():
                if name in table.ENTITIES or name == "event_timestamp" or name.endswith("_id"):
                    continue
                if info.annotation in (int, float):
                    dense.append(f"{table.VIEW}__{name}")
        dense.append(AFFINITY)
        buckets = tuple(id_buckets if f in LARGE_FIELDS else small_buckets for f in SPARSE_FIELDS)
        return cls(SPARSE_FIELDS, buckets, tuple(dense), tuple(_is_log_scaled(c) for c in dense))

    def fingerprint(self) -> str:
        """A short hash of the spec: a model can only score inputs of the same spec."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def hash_ids(self, field: str, values: np.ndarray) -> np.ndarray:
        """Bucket of each id in ``1 .. buckets - 1`` (a multiplicative hash, stable across processes)."""
        n = self.buckets[self.sparse_fields.index(field)]
        if values.dtype.kind in "OUS":  # strings: crc32 of each distinct value
            uniques, inverse = np.unique(values.astype(str), return_inverse=True)
            values = np.array([zlib.crc32(u.encode()) for u in uniques], dtype=np.int64)[inverse]
        v = values.astype(np.int64).astype(np.uint64)
        mixed = (v + np.uint64(_SALT[field])) * _GOLDEN
        return ((mixed >> np.uint64(17)) % np.uint64(n - 1)).astype(np.int64) + 1


@dataclass
class Batch:
    """One mini-batch of encoded rows (see the module docstring)."""

    sparse: torch.Tensor  # [B, len(sparse_fields)] int64
    dense: torch.Tensor  # [B, len(dense_columns)] float32, NaN = missing
    history: torch.Tensor  # [B, history_len] int64, 0 = padding
    position: torch.Tensor  # [B] int64 in 0..MAX_POSITION
    label_ctr: torch.Tensor  # [B] float32
    label_ctcvr: torch.Tensor  # [B] float32
    label_neg: torch.Tensor  # [B] float32, NaN = no label
    weight: torch.Tensor  # [B] float32
    clicked: torch.Tensor  # [B] bool: the impression was clicked (FNW weights apply to these rows)
    # [B] float32 extra weight of the CTR task (0 for FNW's duplicated conversion rows, whose click was
    # already counted); None = 1 everywhere.
    ctr_weight: torch.Tensor | None = None
    # [B] float32 extra weight of the negative-feedback task: 1 / ``sample_rate`` (a kept non-clicked row stands for
    # that many), so downsampling the non-clicks does not tilt pNeg towards clicked rows; None = 1 everywhere.
    neg_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sparse.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: _map(getattr(self, f.name), lambda t: t.to(device, non_blocking=True))
                        for f in fields(self)})

    def slice(self, index: torch.Tensor | slice) -> Batch:
        return Batch(**{f.name: _map(getattr(self, f.name), lambda t: t[index]) for f in fields(self)})


def _map(value: torch.Tensor | None, fn) -> torch.Tensor | None:
    return None if value is None else fn(value)


def _column(frame: pd.DataFrame, name: str, default: float = np.nan) -> np.ndarray:
    if name in frame:
        return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.full(len(frame), default, dtype=np.float64)


def _category(frame: pd.DataFrame) -> np.ndarray:
    if "category_id" in frame:
        return frame["category_id"].fillna(-1).to_numpy(dtype=np.int64)
    return np.nan_to_num(_column(frame, CATEGORY_FROM_FEATURES), nan=-1).astype(np.int64)


def _is_list(value) -> bool:
    """A list-valued cell that holds a list (a missing one is None, or NaN in a frame built from dicts)."""
    return isinstance(value, list | tuple | np.ndarray)


def _affinity(frame: pd.DataFrame, category: np.ndarray) -> np.ndarray:
    out = np.full(len(frame), np.nan)
    if PROFILE_COLUMN not in frame:
        return out
    for i, (profile, cat) in enumerate(zip(frame[PROFILE_COLUMN], category, strict=True)):
        if _is_list(profile) and 0 <= cat < N_CATEGORIES and len(profile) == N_CATEGORIES:
            out[i] = profile[cat]
    return out


def _history(frame: pd.DataFrame, spec: InputSpec) -> np.ndarray:
    out = np.zeros((len(frame), spec.history_len), dtype=np.int64)
    if HISTORY_COLUMN not in frame:
        return out
    for i, ads in enumerate(frame[HISTORY_COLUMN]):
        if _is_list(ads) and len(ads):
            ads = np.asarray(ads[: spec.history_len], dtype=np.int64)
            out[i, : len(ads)] = spec.hash_ids("ad_id", ads)
    return out


def _label(frame: pd.DataFrame, soft: str, hard: str, default: float = 0.0) -> np.ndarray:
    if soft in frame:
        return _column(frame, soft)
    if hard in frame:
        return frame[hard].fillna(False).to_numpy(dtype=np.float64)
    return np.full(len(frame), default)


def _negative_label(frame: pd.DataFrame) -> np.ndarray:
    """``label_neg`` (the joiner's examples), else the matured ``negative_feedback`` (silver rows; null in rows
    labelled before feedback was joined), as 1/0; NaN where unknown (the row does not train the tower)."""
    if "label_neg" in frame or "negative_feedback" not in frame:
        return _column(frame, "label_neg")
    return pd.array(frame["negative_feedback"], dtype="boolean").to_numpy(dtype=np.float64, na_value=np.nan)


def encode(frame: pd.DataFrame, spec: InputSpec) -> Batch:
    """A frame of rows (ids, context, ``<view>__<feature>`` columns, labels) as one :class:`Batch`."""
    category = _category(frame)
    ids = []
    for name in spec.sparse_fields:
        values = category if name == "category_id" else frame[name].to_numpy()
        ids.append(spec.hash_ids(name, values))
    dense = np.empty((len(frame), len(spec.dense_columns)), dtype=np.float32)
    for j, (name, log_scaled) in enumerate(zip(spec.dense_columns, spec.log_scaled, strict=True)):
        col = _affinity(frame, category) if name == AFFINITY else _column(frame, name)
        dense[:, j] = np.log1p(np.clip(col, 0, None)) if log_scaled else col
    position = np.clip(_column(frame, "position", DEFAULT_POSITION), 0, MAX_POSITION)
    label_ctr = _label(frame, "label_ctr", "clicked")
    return Batch(
        sparse=torch.from_numpy(np.stack(ids, axis=1)),
        dense=torch.from_numpy(dense),
        history=torch.from_numpy(_history(frame, spec)),
        position=torch.from_numpy(np.nan_to_num(position).astype(np.int64)),
        label_ctr=torch.from_numpy(label_ctr.astype(np.float32)),
        label_ctcvr=torch.from_numpy(_label(frame, "label_ctcvr", "converted").astype(np.float32)),
        label_neg=torch.from_numpy(_negative_label(frame).astype(np.float32)),
        weight=torch.from_numpy(_column(frame, "weight", 1.0).astype(np.float32)),
        clicked=torch.from_numpy(label_ctr > 0.5),
        ctr_weight=torch.from_numpy(_column(frame, "ctr_weight", 1.0).astype(np.float32)),
        neg_weight=torch.from_numpy(np.nan_to_num(1.0 / _column(frame, "sample_rate", 1.0), nan=1.0)
                                    .astype(np.float32)),
    )


def minibatches(data: Batch, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[Batch]:
    """Mini-batches of an encoded frame, in a seeded random order (or in order)."""
    n = len(data)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield data.slice(order[start:start + batch_size])


def concat(batches: list[Batch]) -> Batch:
    out = {}
    for f in fields(Batch):
        parts = [getattr(b, f.name) for b in batches]
        out[f.name] = None if any(p is None for p in parts) else torch.cat(parts)
    return Batch(**out)

