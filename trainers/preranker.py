"""The pre-ranker, the funnel's second stage: a light model that picks the few dozen candidates the ranker scores.

The full ranker (DIN attention, DCN-v2, MMoE) costs ~20 us per candidate on one core; a request has hundreds of
candidates. The pre-ranker predicts what the ranker would say, far cheaper, so that only the top ``K`` by its
estimated eCPM go through the ranker and the auction.

- **Shares the ranker's embeddings**: its inputs are the served ranker's own id embeddings (every sparse field),
  the mean of the user's recent ads' embeddings (computed once per request: no attention), the dot product of
  every pair of those vectors, the ranker's wide-part biases (its per-id CVR offsets: without them the pre-ranker's
  pCTCVR ranking fell to Spearman 0.87 in ``tests/test_cadences.py``) and the ranker's normalized dense inputs,
  from the same
  :class:`~trainers.data.Batch` the ranker reads; a two-layer MLP, three outputs. An online version's
  pre-ranker reads that version's embeddings.
- **Distilled from the ranker**: trained on the training rows to match the ranker's *calibrated* log-odds of
  pCTR, pCTCVR and pNeg (mean squared error on the logits: the ordering among small probabilities is what the
  funnel needs, and a probability loss would ignore it). The ranker is frozen; the pre-ranker is retrained by
  every batch cadence after the ranker and stored as an extra file of the version (``meta["preranker"]``).
  The retrieval towers' vectors were tried first as its inputs: trained for retrieval with the logQ correction,
  they carry little of an ad's click rate (Spearman 0.14 to the ranker's pCTR on held-out rows); the ranker's
  embeddings without the pairwise dots gave 0.87, with them 0.99 (``tests/test_preranker.py``'s world).
- **Ranking**: eCPM estimate ``1000 x bid x pCTCVR x (1 - pNeg) ** q``, the auction's own formula, so bids
  count.

:class:`Funnel` is what the scorer holds per served version: the ranker and the pre-ranker, with
:meth:`Funnel.top` to choose a request's candidates for the ranker.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from trainers.data import Batch
from trainers.model import RankerBase

if TYPE_CHECKING:
    from trainers.registry import Registry
    from trainers.scoring import ScoringModel

EXTRA_FILE = "preranker.safetensors"
TASKS = ("ctr", "ctcvr", "neg")
EPS = 1e-6


def shared_inputs(ranker: RankerBase, batch: Batch, one_user: bool = False) -> Tensor:
    """``[B, in_dim]``: the ranker's field embeddings, the mean embedding of the user's recent ads, the dot product
    of every pair of those vectors (the factorization-machine view of them), the ranker's wide-part biases and its
    dense inputs.
    ``one_user``: every row is the same user (one request): the history mean is computed once."""
    fields = ranker.field_embeddings(batch)
    history = batch.history[:1] if one_user else batch.history
    count = (history > 0).sum(1, keepdim=True).clamp_min(1)
    recent = ranker.embeddings["ad_id"](history).sum(1) / count
    if one_user:
        recent = recent.expand(len(batch), -1)
    vectors = torch.cat([fields, recent.unsqueeze(1)], 1)
    dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1).index_select(1, _pairs(vectors.shape[1]))
    return torch.cat([fields.flatten(1), recent, dots, ranker.wide_logits(batch), ranker.dense_inputs(batch)], 1)


@functools.cache
def _pairs(n: int) -> Tensor:
    """Flat indices of the upper triangle (each pair once) of an ``n x n`` matrix."""
    i, j = torch.triu_indices(n, n, offset=1)
    return i * n + j


class PreRanker(nn.Module):
    """``[B, 3]`` logits of pCTR, pCTCVR and pNeg from :func:`shared_inputs`."""

    def __init__(self, in_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden": hidden}
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, len(TASKS)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def teacher_logits(scoring: ScoringModel, batch: Batch) -> Tensor:
    """``[B, 3]``: the ranker's calibrated pCTR, pCTCVR and pNeg of every row, as log-odds."""
    scores = scoring.score(batch)
    p = np.stack([np.clip(scores[t], EPS, 1 - EPS) for t in TASKS], 1)
    return torch.from_numpy(np.log(p / (1 - p))).float()


def distil(scoring: ScoringModel, data: Batch, *, epochs: int = 3, batch_size: int = 512, lr: float = 0.003,
           max_rows: int = 300_000, min_steps: int = 1_500, seed: int = 0, progress: bool = True) -> PreRanker:
    """Fit a pre-ranker to ``scoring``'s calibrated outputs on (up to ``max_rows`` of) ``data``; eval mode. Small
    training sets get more epochs, so that it takes at least ``min_steps`` optimizer steps."""
    torch.manual_seed(seed)
    epochs = max(epochs, math.ceil(min_steps * batch_size / max(len(data), 1)))
    if len(data) > max_rows:
        data = data.slice(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:max_rows])
    ranker = scoring.model.cpu().eval()
    target = teacher_logits(scoring, data)
    with torch.inference_mode():
        in_dim = shared_inputs(ranker, data.slice(slice(0, 1))).shape[1]
    model = PreRanker(in_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(data), batch_size):
            rows = order[start:start + batch_size]
            with torch.no_grad():
                x = shared_inputs(ranker, data.slice(rows))
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target[rows])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        if progress and (epoch + 1 == epochs or epoch % 10 == 0):
            print(f"pre-ranker: epoch {epoch + 1}/{epochs}, logit MSE to the ranker {total / len(data):.4f} "
                  f"over {len(data):,} rows", flush=True)
    return model.eval()


def agreement(scoring: ScoringModel, model: PreRanker, data: Batch) -> dict[str, float]:
    """How well the pre-ranker follows the ranker on ``data``: Spearman correlation of pCTR and pCTCVR."""
    from scipy.stats import spearmanr

    target = teacher_logits(scoring, data).numpy()
    with torch.inference_mode():
        out = model(shared_inputs(scoring.model, data)).numpy()
    return {f"spearman_{t}": float(spearmanr(out[:, j], target[:, j]).statistic) for j, t in enumerate(TASKS[:2])}


@dataclass
class Funnel:
    """The pre-ranker that serves with one ranker version, over that version's embeddings."""

    ranker: RankerBase
    preranker: PreRanker

    def predict(self, batch: Batch) -> dict[str, np.ndarray]:
        """Pre-ranker pCTR, pCTCVR and pNeg of one request's rows (one user)."""
        with torch.inference_mode():
            p = torch.sigmoid(self.preranker(shared_inputs(self.ranker, batch, one_user=True))).double().numpy()
        return {t: p[:, j] for j, t in enumerate(TASKS)}

    def top(self, batch: Batch, bids: np.ndarray, k: int, quality_exponent: float = 1.0,
            must: np.ndarray | None = None, eligible: np.ndarray | None = None) -> np.ndarray:
        """Sorted row indices of the ``k`` candidates with the highest estimated eCPM (``eligible`` ones first: a
        row that cannot win is taken only when fewer than ``k`` can), plus the rows of ``must`` (the auction's
        exploration candidates) when given."""
        p = self.predict(batch)
        ecpm = bids * p["ctcvr"] * np.clip(1.0 - p["neg"], 0.0, 1.0) ** quality_exponent
        if eligible is not None:
            ecpm = np.where(eligible, ecpm, -1.0)
        rows = np.argpartition(-ecpm, k - 1)[:k] if k < len(ecpm) else np.arange(len(ecpm))
        if must is not None and must.any():
            rows = np.union1d(rows, np.flatnonzero(must))
        return np.sort(rows)


def preranker_of(registry: Registry, version: str) -> PreRanker | None:
    """The pre-ranker stored with ``version``, or with its line root for an online version; None when there is
    none (a version trained before the funnel, or with it off)."""
    from safetensors.torch import load

    holder = registry.extra_holder(version, "preranker")
    if holder is None:
        return None
    version, meta = holder
    model = PreRanker(**meta["preranker"]["config"])
    model.load_state_dict(load(registry.extra(version, EXTRA_FILE)), strict=True)
    return model.eval()
