"""Candidate retrieval, the funnel's first stage: a two-tower model and an approximate-nearest-neighbour index.

An ad server does not score every ad with the ranker. Retrieval picks a few hundred candidates per request out
of every active ad: a *user tower* embeds the request (the user, the placement, the device and the user's recent
ads), an *ad tower* embeds each ad (its ad, advertiser, campaign and category ids), and the candidates are the
ads whose vectors have the largest inner product with the user's, found in an index of all ad vectors.

- **Inputs**: the ranker's encoded :class:`~trainers.data.Batch` (the same hashed ids), so the towers train on
  the same training sets as the ranker, by the same batch cadences. The user's recent ads are looked up in the
  ad tower's own ``ad_id`` table and averaged (a user who clicked ads like this one is near it).
- **Training**: clicked impressions, in-batch softmax (every other clicked ad of the mini-batch is a negative),
  the logit of each ad corrected by the log of its share of the training clicks (Yi et al. 2019, "Sampling-bias
  -corrected neural modeling": without it popular ads, negatives more often, are pushed down).
- **Index** (:class:`AdIndex`): faiss's HNSW graph with inner product over every active ad's vector (faiss-cpu
  from PyPI: one well-kept library that has the exact index to measure recall against, inner product and HNSW;
  hnswlib has no exact index and usearch fewer users). Rebuilt when the catalog or the towers change
  (:meth:`AdIndex.stale`). ``exact`` is the exhaustive peer: every ad scored by the towers.

``make bench-retrieval`` measures recall@500 against exhaustive scoring and the latency of both.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from trainers.data import Batch, InputSpec, minibatches
from trainers.train import optimizers

if TYPE_CHECKING:
    from trainers.registry import Registry

EXTRA_FILE = "retrieval.safetensors"  # the towers, an extra file of the batch version they were trained with
USER_FIELDS = ("user_id", "placement", "device")
AD_FIELDS = ("ad_id", "advertiser_id", "campaign_id", "category_id")
# Both towers' vectors are unit length (an inner product is a cosine: HNSW's graph search finds the top of a
# cosine far better than of an unbounded inner product); the softmax divides it by this temperature.
TEMPERATURE = 0.05


def _tower(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


class TwoTower(nn.Module):
    """User and ad towers over hashed ids; ``score = <user_vector, ad_vector>`` (unit vectors: a cosine)."""

    def __init__(self, spec: InputSpec, embedding_dim: int = 32, hidden: int = 128, out_dim: int = 32) -> None:
        super().__init__()
        self.spec = spec
        self.config = {"embedding_dim": embedding_dim, "hidden": hidden, "out_dim": out_dim}
        self.user_cols = [spec.sparse_fields.index(f) for f in USER_FIELDS]
        self.ad_cols = [spec.sparse_fields.index(f) for f in AD_FIELDS]
        self.tables = nn.ModuleDict({
            f: nn.Embedding(spec.buckets[spec.sparse_fields.index(f)], embedding_dim, padding_idx=0, sparse=True)
            for f in USER_FIELDS + AD_FIELDS
        })
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[0].zero_()
        # The user side: its ids and the mean of its recent ads (in the ad_id table).
        self.user_tower = _tower(embedding_dim * (len(USER_FIELDS) + 1), hidden, out_dim)
        self.ad_tower = _tower(embedding_dim * len(AD_FIELDS), hidden, out_dim)

    def user_vectors(self, sparse: Tensor, history: Tensor) -> Tensor:
        """``[B, out_dim]`` from ``sparse`` (the Batch's id columns) and ``history`` (hashed recent ads)."""
        ids = [self.tables[f](sparse[:, c]) for f, c in zip(USER_FIELDS, self.user_cols, strict=True)]
        recent = self.tables["ad_id"](history)  # padding rows embed to zeros
        count = (history > 0).sum(1, keepdim=True).clamp_min(1)
        ids.append(recent.sum(1) / count)
        return nn.functional.normalize(self.user_tower(torch.cat(ids, 1)), dim=1)

    def ad_vectors(self, ad_sparse: Tensor) -> Tensor:
        """``[N, out_dim]`` from ``[N, len(AD_FIELDS)]`` hashed ad, advertiser, campaign and category ids."""
        parts = [self.tables[f](ad_sparse[:, i]) for i, f in enumerate(AD_FIELDS)]
        return nn.functional.normalize(self.ad_tower(torch.cat(parts, 1)), dim=1)

    def batch_ads(self, batch: Batch) -> Tensor:
        """The ad columns of ``batch`` (``[B, len(AD_FIELDS)]``), in :meth:`ad_vectors`' order."""
        return batch.sparse[:, self.ad_cols]


def log_click_share(ad_buckets: np.ndarray, buckets: int) -> Tensor:
    """``[buckets]``: the log of each hashed ad's share of the clicks (what the logQ correction subtracts: the
    in-batch negatives are drawn in proportion to it); 0 for an ad without clicks (never in a batch)."""
    counts = np.bincount(ad_buckets, minlength=buckets).astype(np.float64)
    share = counts / max(counts.sum(), 1.0)
    return torch.from_numpy(np.where(counts > 0, np.log(np.where(counts > 0, share, 1.0)), 0.0)).float()


def in_batch_loss(model: TwoTower, batch: Batch, log_q: Tensor) -> Tensor:
    """Softmax over the mini-batch's ads for each clicked row, logQ-corrected (``log_q``: by hashed ad id);
    other rows with the same ad are not its negatives."""
    users = model.user_vectors(batch.sparse, batch.history)
    ad_ids = model.batch_ads(batch)
    ads = model.ad_vectors(ad_ids)
    logits = users @ ads.T / TEMPERATURE - log_q[ad_ids[:, 0]][None, :]
    same = ad_ids[:, 0][:, None] == ad_ids[:, 0][None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(users), dtype=torch.bool), -math.inf)
    return nn.functional.cross_entropy(logits, torch.arange(len(users)))


def clicked_rows(data: Batch) -> Tensor:
    """Indices of ``data``'s clicks, each once: FNW's duplicated conversion rows (CTR weight 0) and rows that take
    an example back (negative weight) are not clicks."""
    keep = (data.label_ctr > 0.5) & (data.weight > 0)
    if data.ctr_weight is not None:
        keep &= data.ctr_weight > 0
    return torch.nonzero(keep).squeeze(1)


def train_two_tower(data: Batch, spec: InputSpec, *, epochs: int = 3, batch_size: int = 512, lr: float = 0.005,
                    seed: int = 0, model: TwoTower | None = None, progress: bool = True) -> TwoTower:
    """Fit the towers on ``data``'s clicked rows (a warm start continues ``model``); returns the model, in eval
    mode. Rows with ``label_ctr`` 0 are not used: retrieval learns which ads a user clicks."""
    torch.manual_seed(seed)
    clicked = clicked_rows(data)
    if len(clicked) < 2:
        raise ValueError(f"two-tower training needs clicked rows; the data has {len(clicked)}")
    clicks = data.slice(clicked)
    model = model or TwoTower(spec)
    log_q = log_click_share(clicks.sparse[:, model.ad_cols[0]].numpy(), spec.buckets[model.ad_cols[0]])
    opts = optimizers(model, lr)
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for mb in minibatches(clicks, batch_size, shuffle=True, seed=seed + epoch):
            if len(mb) < 2:
                continue
            for opt in opts:
                opt.zero_grad()
            loss = in_batch_loss(model, mb, log_q)
            loss.backward()
            for opt in opts:
                opt.step()
            total, n = total + float(loss.detach()) * len(mb), n + len(mb)
        if progress:
            print(f"two-tower: epoch {epoch + 1}/{epochs}, in-batch softmax loss {total / max(n, 1):.4f} "
                  f"over {n:,} clicks", flush=True)
    return model.eval()


def towers_of(registry: Registry, version: str) -> TwoTower | None:
    """The towers that serve with ``version``: its own, or its line root's for an online version (the online
    trainer updates the ranker only); None for a version trained before the towers existed."""
    from safetensors.torch import load

    from trainers.model import spec_from_dict

    holder = registry.extra_holder(version, "retrieval")
    if holder is None:
        return None
    version, meta = holder
    model = TwoTower(spec_from_dict(meta["model_config"]["spec"]), **meta["retrieval"]["config"])
    model.load_state_dict(load(registry.extra(version, EXTRA_FILE)), strict=True)
    return model.eval()


@dataclass(frozen=True)
class Catalog:
    """The active ads: catalog ids (returned by a search) and their hashed tower inputs."""

    ad_ids: np.ndarray  # [N] int64
    ad_sparse: np.ndarray  # [N, len(AD_FIELDS)] int64, hashed

    @classmethod
    def from_frame(cls, ads: pd.DataFrame, spec: InputSpec) -> Catalog:
        """``ads`` has ``ad_id``, ``advertiser_id``, ``campaign_id``, ``category_id`` (one row per ad)."""
        ads = ads.drop_duplicates("ad_id")
        cols = [spec.hash_ids(f, ads[f].to_numpy()) for f in AD_FIELDS]
        return cls(ads["ad_id"].to_numpy(np.int64), np.stack(cols, 1))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.ad_ids.tobytes() + self.ad_sparse.tobytes()).hexdigest()[:16]


class AdIndex:
    """Every active ad's tower vector in a faiss HNSW index (inner product), with the exact search beside it."""

    def __init__(self, model: TwoTower, catalog: Catalog, model_version: str | None = None, m: int = 32,
                 ef_construction: int = 200, ef_search: int = 1024, hnsw: bool = True) -> None:
        """``hnsw=False``: only the exact search (a small catalog, where scoring every ad is faster)."""
        import faiss

        with torch.inference_mode():
            vectors = model.ad_vectors(torch.from_numpy(catalog.ad_sparse)).numpy().astype(np.float32)
        self.vectors = np.ascontiguousarray(vectors)
        self.catalog = catalog
        self.built_for = (model_version, catalog.fingerprint())  # what :meth:`stale` compares with
        self.hnsw = None
        if hnsw:
            self.hnsw = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
            self.hnsw.hnsw.efConstruction = ef_construction
            self.hnsw.add(self.vectors)
            self.hnsw.hnsw.efSearch = ef_search

    def __len__(self) -> int:
        return len(self.catalog.ad_ids)

    def stale(self, model_version: str | None, catalog: Catalog) -> bool:
        """Whether the index must be rebuilt: other towers or another catalog."""
        return self.built_for != (model_version, catalog.fingerprint())

    def search(self, users: np.ndarray, k: int) -> np.ndarray:
        """``[Q, k]`` catalog ad ids of the approximate top ``k`` per user vector (``users``: ``[Q, dim]``)."""
        if self.hnsw is None:
            raise ValueError("this index was built without HNSW (hnsw=False): use exact()")
        k = min(k, len(self))
        self.hnsw.hnsw.efSearch = max(self.hnsw.hnsw.efSearch, k)
        _, rows = self.hnsw.search(np.ascontiguousarray(users, dtype=np.float32), k)
        return self.catalog.ad_ids[rows]

    def exact(self, users: np.ndarray, k: int) -> np.ndarray:
        """``[Q, k]`` catalog ad ids of the exact top ``k``: every ad scored (the exhaustive peer)."""
        k = min(k, len(self))
        scores = np.asarray(users, dtype=np.float32) @ self.vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return self.catalog.ad_ids[top]


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact top k that the approximate top k holds."""
    hits = [len(np.intersect1d(a, e, assume_unique=True)) / len(e) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits))
