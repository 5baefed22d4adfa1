"""Candidate retrieval for the ad server: the promoted version's two towers and an index over the live ads.

The funnel's first stage (``trainers.retrieval`` holds the model and the index). Per hour, or whenever the
catalog or the promoted version's towers change, the index over the live ads is rebuilt (:meth:`AdIndex.stale`);
per request, the user's recent ads are read from the online store (the ``user_recent_ad_ids`` feature the ranker
reads too), the user tower embeds the user, placement, device and those ads, and the ``k`` ads with the highest
``cosine / TEMPERATURE + bid_weight x log(bid)`` are the request's candidates. Bids count because the auction
ranks by value: on click affinity alone, retrieval kept the ranker's winner less often and the closed loop's
revenue fell 8.6 % below the ranker on every ad (``make bench-funnel``); with the bid term, within 0.1 %. Below
``exact_below`` ads every ad is scored (numpy, faster than HNSW at that size: ``make bench-retrieval``); above it
faiss's HNSW graph gives the ``4 k`` nearest by cosine and the bid-aware top ``k`` is taken from those (an ad
far in cosine with an outsized bid can be missed there).

:class:`Retriever` is a ``streams.simulator.closed_loop.CandidateSource``: the closed loop's ad server asks it.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from feature_repo.online import OnlineReader
from trainers.data import HISTORY_COLUMN
from trainers.registry import Registry
from trainers.retrieval import TEMPERATURE, USER_FIELDS, AdIndex, Catalog, TwoTower, towers_of

log = logging.getLogger(__name__)


class Retriever:
    """The ``k`` live ads nearest to each request's user vector (see the module docstring)."""

    def __init__(self, registry: Registry, reader: OnlineReader, k: int = 500, exact_below: int = 100_000,
                 bid_weight: float = 1.0) -> None:
        self.registry, self.reader, self.k, self.exact_below = registry, reader, k, exact_below
        self.bid_weight = bid_weight
        self.towers: TwoTower | None = None
        self.towers_of: str | None = None  # the version whose files hold the towers (a line root)
        self.index: AdIndex | None = None
        self.rebuilds = 0
        self._refused: str | None = None  # the promoted version whose towers were refused (said once)

    def _load_towers(self) -> None:
        """The promoted version's towers (its line root's for an online version). A promoted version without
        towers, or whose towers do not load, leaves the current ones serving (logged); with none yet, it raises."""
        version = self.registry.promoted()
        if version is None:
            raise RuntimeError("candidate retrieval: nothing is promoted")
        source = self.registry.meta(version).get("line_root") or version
        if source in (self.towers_of, self._refused):
            return
        try:
            towers = towers_of(self.registry, source)
            if towers is None:
                raise ValueError("it has no retrieval towers")
        except Exception as err:  # noqa: BLE001 - missing, corrupt or incompatible towers: keep the current ones
            if self.towers is None:
                raise RuntimeError(f"candidate retrieval: promoted {version}: {err}") from err
            log.warning("retrieval: promoted %s: %s; the towers of %s keep serving", version, err, self.towers_of)
            self._refused = source
            return
        self.towers, self.towers_of = towers, source

    def for_hour(self, ads: pd.DataFrame) -> None:
        """Index ``ads`` (one row per live ad) with the promoted version's towers, unless that index exists."""
        self._load_towers()
        catalog = Catalog.from_frame(ads, self.towers.spec)
        if len(catalog.ad_ids) != len(ads):
            raise ValueError("candidate retrieval: the live ads must be one row per ad")
        if self.index is None or self.index.stale(self.towers_of, catalog):
            self.index = AdIndex(self.towers, catalog, self.towers_of, hnsw=len(catalog.ad_ids) >= self.exact_below)
            self.rebuilds += 1
            log.info("retrieval: index over %d ads for %s", len(catalog.ad_ids), self.towers_of)
        self._order = np.argsort(catalog.ad_ids, kind="stable")
        self._sorted = catalog.ad_ids[self._order]
        bids = ads["bid"].to_numpy(np.float64) if "bid" in ads else np.ones(len(ads))
        self._log_bid = (self.bid_weight * np.log(np.maximum(bids, 1e-9))).astype(np.float32)

    def user_vector(self, user_id: int, placement: str, device: str, event_time_ms: int) -> np.ndarray:
        """``[1, dim]``: the user tower on the user's ids and recent ads as the online store has them now."""
        spec = self.towers.spec
        recent = self.reader.features(user_id, [], as_of_ms=event_time_ms).user.get(HISTORY_COLUMN) or []
        history = np.zeros((1, spec.history_len), dtype=np.int64)
        if len(recent):
            ads = np.asarray(recent[: spec.history_len], dtype=np.int64)
            history[0, : len(ads)] = spec.hash_ids("ad_id", ads)
        sparse = np.zeros((1, len(spec.sparse_fields)), dtype=np.int64)
        for field, value in zip(USER_FIELDS, (user_id, placement, device), strict=True):
            sparse[0, spec.sparse_fields.index(field)] = spec.hash_ids(field, np.array([value]))[0]
        with torch.inference_mode():
            return self.towers.user_vectors(torch.from_numpy(sparse), torch.from_numpy(history)).numpy()

    def candidates(self, user_id: int, placement: str, device: str, event_time_ms: int) -> np.ndarray:
        """Rows of the hour's ads (as given to :meth:`for_hour`) of the request's ``k`` candidates."""
        if self.index is None:
            raise RuntimeError("candidate retrieval: for_hour() must index the live ads first")
        user = self.user_vector(user_id, placement, device, event_time_ms)[0]
        if self.index.hnsw is not None:  # the graph's nearest 4k by cosine, then the value-aware top k of those
            rows = self._order[np.searchsorted(self._sorted, self.index.search(user[None, :], 4 * self.k)[0])]
        else:
            rows = np.arange(len(self._log_bid))
        score = self.index.vectors[rows] @ user / TEMPERATURE + self._log_bid[rows]
        k = min(self.k, len(rows))
        return rows[np.argpartition(-score, k - 1)[:k]]
