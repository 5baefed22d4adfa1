"""One request's model inputs, built straight from the online read path with numpy, and what is logged of them.

:func:`encode_request` turns a :class:`~feature_repo.online.RequestFeatures` (one user, N candidates) and the
request's context into the ranker's :class:`~trainers.data.Batch` without a pandas frame per request: the
result is tensor for tensor what ``trainers.data.encode`` makes of the equivalent frame (:func:`request_frame`:
the user's columns repeated, the ad and cross columns, the catalog ids, placement, device and
``DEFAULT_POSITION``), NaN positions included, because each dense column goes through the same numpy
operations on an array of the same shape.

:meth:`EncodedRequest.logged` gives the exact raw values of one candidate for its ``PredictionLog``: scalar model
inputs by column (absent when the store had none) and the list inputs (the user's recent ads and category
profile). :func:`frame_from_logs` turns logged records back into the frame ``encode`` reads, so training and
replay encode exactly what serving scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from feature_repo.online import RequestFeatures
from schemas.events import PredictionLog
from schemas.features import N_CATEGORIES
from trainers.data import AFFINITY, DEFAULT_POSITION, HISTORY_COLUMN, PROFILE_COLUMN, Batch, InputSpec

LIST_COLUMNS = (HISTORY_COLUMN, PROFILE_COLUMN)
# Counts that tell how much an ad has been shown: the last 7 days as of the gold build, and the real-time 24 h.
IMPRESSION_COUNTS = ("ad_features__ad_impressions_7d", "ad_realtime__ad_impressions_24h")
CLICK_COUNTS = ("ad_features__ad_clicks_7d", "ad_realtime__ad_clicks_24h")
LOG_COLUMNS = ("request_id", "impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "category_id",
               "placement", "device", "position", "bid", "model_version", "event_time_ms", "pctr", "pcvr",
               "ecpm", "price", "explored", "arm")


@dataclass
class EncodedRequest:
    """The batch the model scores, and the raw values behind it (``raw[:, j]`` is ``columns[j]``, NaN missing)."""

    batch: Batch
    # Every scalar feature of the service served for the candidates, as logged: the spec's dense columns (but the
    # derived one), then the store's features the model reads as ids (the ad's campaign, advertiser, category),
    # so the replay set has every column of the training set.
    columns: tuple[str, ...]
    raw: np.ndarray  # float64 [n, len(columns)], NaN where the store had no value
    lists: dict[str, list]  # the user's list features that the store had (one value for every candidate)

    def logged(self, row: int) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(``features``, ``feature_lists``) of candidate ``row`` as a ``PredictionLog`` holds them."""
        features = {c: v for c, v in zip(self.columns, self.raw[row].tolist(), strict=True) if not math.isnan(v)}
        return features, {name: [float(x) for x in values] for name, values in self.lists.items()}


def _scalar_column(name: str, features: RequestFeatures, n: int) -> np.ndarray:
    """One scalar input of every candidate as float64, NaN where the store had no value."""
    if name in features.ad_values:
        values = features.ad_values[name].astype(np.float64)
        present = features.ad_present[name]
        return values if present.all() else np.where(present, values, np.nan)
    if name in features.cross:
        return np.array([np.nan if v is None else v for v in features.cross[name]], dtype=np.float64)
    value = features.user.get(name)
    return np.full(n, np.nan if value is None else float(value), dtype=np.float64)


def _hashed(spec: InputSpec, field: str, value: object, n: int) -> np.ndarray:
    """Bucket of one id repeated ``n`` times (the hash of a value does not depend on its neighbours)."""
    return np.repeat(spec.hash_ids(field, np.array([value])), n)


def encode_request(spec: InputSpec, features: RequestFeatures, *, placement: str, device: str,
                   campaign_ids: Sequence[int], advertiser_ids: Sequence[int],
                   category_ids: Sequence[int]) -> EncodedRequest:
    """The batch of one request scored at ``DEFAULT_POSITION`` (ids: the catalog's, features: the store's)."""
    n = len(features.ad_ids)
    category = np.asarray(category_ids, dtype=np.int64)
    ids = {"user_id": _hashed(spec, "user_id", int(features.user_id), n),
           "ad_id": spec.hash_ids("ad_id", np.asarray(features.ad_ids, dtype=np.int64)),
           "advertiser_id": spec.hash_ids("advertiser_id", np.asarray(advertiser_ids, dtype=np.int64)),
           "campaign_id": spec.hash_ids("campaign_id", np.asarray(campaign_ids, dtype=np.int64)),
           "category_id": spec.hash_ids("category_id", category),
           "placement": _hashed(spec, "placement", placement, n),
           "device": _hashed(spec, "device", device, n)}
    sparse = np.stack([ids[f] for f in spec.sparse_fields], axis=1) if n else np.zeros((0, len(spec.sparse_fields)),
                                                                                       np.int64)
    lists = {c: v for c, v in features.user.items() if isinstance(v, list)}
    inputs = tuple(c for c in spec.dense_columns if c != AFFINITY)
    columns = inputs + tuple(c for c in features.ad_values if c not in inputs)
    raw = np.empty((n, len(columns)), dtype=np.float64)
    dense = np.empty((n, len(spec.dense_columns)), dtype=np.float32)
    j_raw = 0
    for j, (name, log_scaled) in enumerate(zip(spec.dense_columns, spec.log_scaled, strict=True)):
        if name == AFFINITY:
            col = _affinity(lists.get(PROFILE_COLUMN), category)
        else:
            col = _scalar_column(name, features, n)
            raw[:, j_raw] = col
            j_raw += 1
        dense[:, j] = np.log1p(np.clip(col, 0, None)) if log_scaled else col
    for j in range(len(inputs), len(columns)):
        raw[:, j] = _scalar_column(columns[j], features, n)
    history = np.zeros((n, spec.history_len), dtype=np.int64)
    recent = lists.get(HISTORY_COLUMN)
    if recent is not None and len(recent):
        ads = np.asarray(recent[: spec.history_len], dtype=np.int64)
        history[:, : len(ads)] = spec.hash_ids("ad_id", ads)
    batch = Batch(sparse=torch.from_numpy(sparse), dense=torch.from_numpy(dense), history=torch.from_numpy(history),
                  position=torch.full((n,), DEFAULT_POSITION, dtype=torch.int64), label_ctr=torch.zeros(n),
                  label_ctcvr=torch.zeros(n), label_neg=torch.full((n,), float("nan")), weight=torch.ones(n),
                  clicked=torch.zeros(n, dtype=torch.bool), ctr_weight=torch.ones(n))
    return EncodedRequest(batch, columns, raw, lists)


def _affinity(profile: list | None, category: np.ndarray) -> np.ndarray:
    """The user's profile share in each candidate's category (as ``trainers.data`` derives it)."""
    out = np.full(len(category), np.nan)
    if profile is not None and len(profile) == N_CATEGORIES:
        ok = (category >= 0) & (category < N_CATEGORIES)
        out[ok] = np.asarray(profile, dtype=np.float64)[category[ok]]
    return out


def ad_counts(features: RequestFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(impressions, clicks) of each candidate so far: the larger of the 7-day (gold) and 24-hour (real-time)
    counts, which overlap; 0 where the store has neither (a brand-new ad)."""
    n = len(features.ad_ids)

    def count(name: str) -> np.ndarray:
        if name not in features.ad_values:
            return np.zeros(n)
        return np.where(features.ad_present[name], features.ad_values[name].astype(np.float64), 0.0)

    (imp_gold, imp_rt), (clk_gold, clk_rt) = map(count, IMPRESSION_COUNTS), map(count, CLICK_COUNTS)
    gold = imp_gold >= imp_rt
    return np.where(gold, imp_gold, imp_rt), np.where(gold, clk_gold, clk_rt)


def request_frame(features: RequestFeatures, *, placement: str, device: str, campaign_ids: Sequence[int],
                  advertiser_ids: Sequence[int], category_ids: Sequence[int]) -> pd.DataFrame:
    """The same request as a frame for ``trainers.data.encode`` (the slow path: the reference it must equal)."""
    frame = pd.DataFrame(features.to_feast_dict())
    n = len(frame)
    frame["advertiser_id"] = np.asarray(advertiser_ids, dtype=np.int64)
    frame["campaign_id"] = np.asarray(campaign_ids, dtype=np.int64)
    frame["category_id"] = np.asarray(category_ids, dtype=np.int64)
    frame["placement"] = [placement] * n
    frame["device"] = [device] * n
    frame["position"] = DEFAULT_POSITION
    return frame


def frame_from_logs(records: Sequence[PredictionLog], scoring: bool = False) -> pd.DataFrame:
    """Logged candidates as the frame ``trainers.data.encode`` reads: ids, context, every logged feature column
    (NaN where a record has none) and the list columns (None where absent).

    ``position`` is the slot each was shown in (what training learns the position bias from); ``scoring=True``
    sets it to ``DEFAULT_POSITION``, as the model scored it, to re-encode exactly the served batch."""
    rows = []
    for r in records:
        row = {c: getattr(r, c) for c in LOG_COLUMNS}
        row.update(r.features)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(LOG_COLUMNS))
    history = [r.feature_lists.get(HISTORY_COLUMN) for r in records]
    frame[HISTORY_COLUMN] = [None if h is None else [int(x) for x in h] for h in history]
    frame[PROFILE_COLUMN] = [r.feature_lists.get(PROFILE_COLUMN) for r in records]
    if scoring:
        frame["position"] = DEFAULT_POSITION
    return frame
