"""The scorer: one ad request in, the ads to show out, every shown candidate logged with what the model saw.

For a request (a user, a context, N candidate ads from the ad server's catalog, with their bids):

1. the user's arm of the A/B experiment picks the model: the promoted one, or a version the arm is pinned to;
2. the features of the user and of every candidate come from the online read path in one call;
3. the request is encoded with numpy (``request_features.encode_request``, no pandas);
4. frequency caps: one read (``HGETALL``) of the user's counters of the UTC day of the request's event time
   (``fcap:<project>:<yyyymmdd>:<user_id>``, a field per campaign); a campaign at the cap cannot win;
5. the funnel's pre-ranker (``trainers.preranker``, stored with the version) picks the ``serving.rank_top_k``
   candidates that can win with the highest estimated eCPM, plus the new ads when the request explores, and the
   ranker scores those in one batched call under ``torch.inference_mode()`` (every candidate when the version
   has no pre-ranker);
6. the auction (``auction.run_auction``): eCPM ranking, generalized second price, Thompson exploration of new ads;
7. the winners' counters are incremented (``HINCRBY``, ``EXPIRE`` 2 days; one pipeline) and one
   :class:`~schemas.events.PredictionLog` per shown ad is handed to the prediction logger, which never blocks.

A thread polls the registry every ``serving.reload_every_s``; a newly promoted version is loaded, warmed up and
swapped in with one reference assignment, so a request in flight keeps the model it started with and none is
dropped. A version that does not load is skipped (the reason is logged) and the current model keeps serving.

Threads: ``torch.set_num_threads(threads)`` is set at start, by default half the cores (1 to 4): one request is a
small batch (500 rows, about 0.3 GFLOP) that 2-4 intra-op threads speed up, but the HTTP service runs several
requests at once on its thread pool and Redis/JSON work needs cores too; more threads than free cores make
OpenMP threads spin and wait on each other (on a busy 2-core machine two threads were 5x slower than one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch

from feature_repo.online import OnlineReader, wall_ms
from infra.settings import Settings
from schemas.events import PredictionLog
from streams.serving.auction import NO_CAP, AuctionResult, explores, run_auction
from streams.serving.experiment import PROMOTED, Experiment
from streams.serving.request_features import EncodedRequest, ad_counts, encode_request
from trainers.calibration import undo_downsampling
from trainers.data import Batch
from trainers.model import autocast
from trainers.preranker import Funnel, PreRanker, preranker_of
from trainers.registry import Registry
from trainers.scoring import ScoringModel, load

log = logging.getLogger(__name__)

FCAP_TTL_S = 2 * 24 * 3600
LATENCY_WINDOW = 4096
MODEL_CACHE = 4  # loaded promoted versions kept, so a rollback to a recent one is instant


@dataclass(frozen=True)
class AdRequest:
    """One ad request: the user, the context and the candidates with their catalog ids and bids (per conversion)."""

    request_id: str
    user_id: int
    placement: str
    device: str
    event_time_ms: int
    slots: int
    ad_ids: Sequence[int]
    campaign_ids: Sequence[int]
    advertiser_ids: Sequence[int]
    category_ids: Sequence[int]
    bids: Sequence[float]

    def __post_init__(self) -> None:
        n = len(self.ad_ids)
        for name in ("campaign_ids", "advertiser_ids", "category_ids", "bids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {n} ad_ids")
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0, got {self.slots}")


@dataclass(frozen=True)
class Shown:
    """An ad the auction showed (``position`` 0 is the top slot); ``price`` is per conversion."""

    impression_id: str
    ad_id: int
    campaign_id: int
    advertiser_id: int
    category_id: int
    position: int
    bid: float
    pctr: float
    pcvr: float
    ecpm: float
    price: float
    explored: bool
    model_version: str
    arm: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Served:
    """One request as the scorer handled it: the encoded batch, the scores, the auction and what was shown."""

    request: AdRequest
    arm: str
    model: ScoringModel | None
    encoded: EncodedRequest | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # of the ranked rows
    ranked: np.ndarray | None = None  # the request rows the ranker scored (the funnel's pick, or every row)
    auction: AuctionResult | None = None
    shown: list[Shown] = field(default_factory=list)
    logs: list[PredictionLog] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage: features, encode, prerank, model, ...


def score_batch(model: ScoringModel, batch: Batch, device: torch.device) -> dict[str, np.ndarray]:
    """``model.score(batch, device)`` for a model already in eval mode on ``device``: the same arithmetic (network at
    the default position, downsampling undone, calibrated) without ``trainers.train.predict``'s per-call
    ``eval()``, ``to(device)`` and mini-batch copies, about 0.5 ms of a request. Tests check it equals ``score``."""
    with torch.inference_mode(), autocast(device):
        out = model.model(batch if device.type == "cpu" else batch.to(device), position=False)
        ctr, cvr, neg = (t.float().cpu().numpy().astype(np.float64) for t in (out.p_ctr, out.p_cvr, out.p_neg))
    ctr = undo_downsampling(ctr, model.negative_rate)
    return model.calibrate({"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr, "neg": neg})


def impression_id(request_id: str, position: int) -> str:
    """The id of the impression a request's slot becomes (deterministic: a replay gets the same ids)."""
    return f"{request_id}-{position}"


def fcap_key(project: str, event_time_ms: int, user_id: int) -> str:
    day = datetime.fromtimestamp(event_time_ms / 1000, UTC).strftime("%Y%m%d")
    return f"fcap:{project}:{day}:{user_id}"


class Scorer:
    """Scores ad requests (see the module docstring). ``start()`` before use, ``close()`` after.

    A reader or logger passed in is used as is (the caller starts and closes it); otherwise the scorer makes its
    own from ``settings``. ``device``: where the model runs (``cpu``, ``cuda``)."""

    def __init__(self, settings: Settings, registry: Registry | None = None, reader: OnlineReader | None = None,
                 logger=None, device: str = "cpu", threads: int | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings.registry_dir)
        self.reader, self._own_reader = reader or OnlineReader(settings), reader is None
        self.logger, self._own_logger = logger, logger is None
        self.experiment = Experiment.from_settings(settings)
        self.redis = settings.redis.client()
        self.device = torch.device(device)
        self.threads = threads or max(1, min(4, (os.cpu_count() or 1) // 2))
        self._promoted: ScoringModel | None = None
        self._pinned: dict[str, ScoringModel] = {}
        self._cache: dict[str, ScoringModel] = {}
        self._prerankers: dict[str, PreRanker | None] = {}  # by the version whose files hold it (a line root)
        self._failed: dict[str, object] = {}  # version -> the promotion (its at_ms) it failed to load under
        self._reload_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._versions: Counter[str] = Counter()
        self._arms: Counter[str] = Counter()
        self.requests = self.candidates = self.shown = self.explored = 0
        self.reloads = self.reload_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Scorer:
        """Start the reader and the logger (if owned), load the promoted and pinned models, start reloading."""
        torch.set_num_threads(self.threads)
        if self._own_reader:
            self.reader.start()
        if self.logger is None:
            from streams.serving.prediction_log import PredictionLogger

            self.logger = PredictionLogger(self.settings).start()
        model = self._prepare(load(self.registry))  # the promoted one (or the previous, if it is corrupt)
        self._cache[model.version] = model
        self._promoted = model
        for version in self.experiment.pinned_versions():
            try:
                self._pinned[version] = self._prepare(load(self.registry, version))
            except Exception as err:
                raise RuntimeError(f"experiment arm pinned to {version}, which does not load: {err}") from err
        log.info("scorer: serving %s%s", model.version,
                 f" (pinned arms: {', '.join(self._pinned)})" if self._pinned else "")
        self._thread = threading.Thread(target=self._reload_loop, name="scorer-reload", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._own_logger and self.logger is not None:
            self.logger.close()
        if self._own_reader:
            self.reader.close()
        self.redis.close()

    # -- models ------------------------------------------------------------------------------------------------

    @property
    def model_version(self) -> str | None:
        """The promoted version being served."""
        return self._promoted.version if self._promoted else None

    @property
    def pinned_versions(self) -> list[str]:
        """The versions A/B arms are pinned to."""
        return sorted(self._pinned)

    def _prepare(self, model: ScoringModel) -> ScoringModel:
        """Move to the device and score one dummy row, so the first real request pays no warm-up."""
        model.model.eval()
        model.model.to(self.device)
        spec = model.model.spec
        dummy = Batch(sparse=torch.zeros(1, len(spec.sparse_fields), dtype=torch.int64),
                      dense=torch.full((1, len(spec.dense_columns)), float("nan")),
                      history=torch.zeros(1, spec.history_len, dtype=torch.int64),
                      position=torch.zeros(1, dtype=torch.int64), label_ctr=torch.zeros(1),
                      label_ctcvr=torch.zeros(1), label_neg=torch.zeros(1), weight=torch.ones(1),
                      clicked=torch.zeros(1, dtype=torch.bool))
        with torch.inference_mode():
            model.score(dummy, self.device)
        self._funnel_for(model)
        return model

    def _funnel_for(self, model: ScoringModel) -> Funnel | None:
        """The pre-ranker that serves with ``model`` over its embeddings (loaded once per line root); None without."""
        if self.settings.serving.rank_top_k <= 0 or model.version is None:
            return None
        source = model.meta.get("line_root") or model.version
        if source not in self._prerankers:
            try:
                self._prerankers[source] = preranker_of(self.registry, source)
            except Exception as err:  # noqa: BLE001 - a broken pre-ranker file: the ranker scores every candidate
                log.warning("scorer: %s serves without its pre-ranker (%s): the ranker scores every candidate",
                            model.version, err)
                self._prerankers[source] = None
        pre = self._prerankers[source]
        return None if pre is None else Funnel(model.model, pre)

    def reload(self) -> bool:
        """Swap in the promoted version if it changed; True when a new model now serves. Loading happens here,
        off the request path; a version that fails to load is skipped (logged) until it is promoted again."""
        with self._reload_lock:
            try:
                state = self.registry.promotion()
            except Exception as err:  # noqa: BLE001 - an unreadable PROMOTED must not stop serving
                log.warning("scorer: cannot read the promotion: %s", err)
                return False
            if not state or self._promoted is None or state["version"] == self._promoted.version:
                return False
            version, stamp = state["version"], state.get("at_ms")
            if version in self._failed and self._failed[version] == stamp:
                return False
            try:
                model = self._cache.get(version) or self._prepare(load(self.registry, version))
            except Exception as err:  # noqa: BLE001 - corrupt, missing, incompatible: keep serving the old one
                self._failed[version] = stamp
                self.reload_failures += 1
                log.warning("scorer: not serving promoted %s: %s; %s keeps serving", version, err,
                            self._promoted.version)
                return False
            self._cache[version] = model
            while len(self._cache) > MODEL_CACHE:
                self._cache.pop(next(iter(self._cache)))
            old, self._promoted = self._promoted.version, model  # one reference assignment: atomic
            self.reloads += 1
            log.info("scorer: now serving %s (was %s)", version, old)
            return True

    def _reload_loop(self) -> None:
        while not self._stop.wait(self.settings.serving.reload_every_s):
            try:
                self.reload()
            except Exception:  # noqa: BLE001 - the reload thread must survive anything
                log.exception("scorer: reload failed")

    # -- requests ----------------------------------------------------------------------------------------------

    def score(self, request: AdRequest) -> list[Shown]:
        """The ads to show for ``request``, in slot order (empty when no candidate is eligible)."""
        return self.serve(request).shown

    def serve(self, request: AdRequest) -> Served:
        """:meth:`score` with everything it computed (the encoded batch, the scores, the auction, the logs)."""
        t0 = time.perf_counter()
        arm, version = self.experiment.arm_of(request.user_id)
        model = self._promoted if version == PROMOTED else self._pinned[version]
        if model is None:
            raise RuntimeError("the scorer is not started")
        out = Served(request, arm, model)
        n = len(request.ad_ids)
        if n and request.slots > 0:
            self._serve(request, model, out)
        self._record(out, n, (time.perf_counter() - t0) * 1000)
        return out

    def _serve(self, request: AdRequest, model: ScoringModel, out: Served) -> None:
        s, clock = self.settings.serving, time.perf_counter
        t0, read_ms = clock(), wall_ms()  # the read's time: rows written after it were not seen
        features = self.reader.features(request.user_id, request.ad_ids, as_of_ms=request.event_time_ms,
                                        category_ids=request.category_ids, advertiser_ids=request.advertiser_ids)
        t1 = clock()
        enc = encode_request(model.model.spec, features, placement=request.placement, device=request.device,
                             campaign_ids=request.campaign_ids, advertiser_ids=request.advertiser_ids,
                             category_ids=request.category_ids)
        t2 = clock()
        bids = np.asarray(request.bids, dtype=np.float64)
        impressions, clicks = ad_counts(features)
        campaigns = np.asarray(request.campaign_ids, dtype=np.int64)
        key = fcap_key(self.settings.feast_project, request.event_time_ms, request.user_id)
        cap_left = self._cap_left(key, campaigns)
        ranked = self._prerank(model, enc.batch, bids, impressions, (cap_left > 0) & (bids > 0), request.request_id)
        t_pre = clock()
        batch = enc.batch if ranked is None else enc.batch.slice(torch.from_numpy(ranked))
        scores = score_batch(model, batch, self.device)
        t3 = clock()
        rows = np.arange(len(bids)) if ranked is None else ranked  # the ranked candidates' request rows
        result = run_auction(bids[rows], scores["ctr"], scores["cvr"], scores["neg"],
                             ad_ids=np.asarray(request.ad_ids, dtype=np.int64)[rows], slots=request.slots,
                             campaign_ids=campaigns[rows], cap_left=cap_left[rows], impressions=impressions[rows],
                             clicks=clicks[rows], request_id=request.request_id, quality_exponent=s.quality_exponent,
                             reserve_ecpm=s.reserve_ecpm, explore_share=s.explore_share,
                             new_ad_impressions=s.new_ad_impressions, prior_strength=s.prior_strength)
        winners = rows[result.winners].tolist()
        if winners and s.frequency_cap > 0:
            pipe = self.redis.pipeline(transaction=False)
            for i in winners:
                pipe.hincrby(key, str(int(campaigns[i])), 1)
            pipe.expire(key, FCAP_TTL_S)
            pipe.execute()
        t4 = clock()
        out.encoded, out.scores, out.auction = enc, scores, result
        for slot, (i, r) in enumerate(zip(winners, result.winners.tolist(), strict=True)):
            shown = Shown(impression_id(request.request_id, slot), int(request.ad_ids[i]), int(campaigns[i]),
                          int(request.advertiser_ids[i]), int(request.category_ids[i]), slot, float(request.bids[i]),
                          float(scores["ctr"][r]), float(scores["cvr"][r]), float(result.ecpm[slot]),
                          float(result.price[slot]), bool(result.explored[slot]), model.version, out.arm)
            features_i, lists_i = enc.logged(i)
            out.shown.append(shown)
            out.logs.append(PredictionLog(
                request_id=request.request_id, impression_id=shown.impression_id, user_id=int(request.user_id),
                ad_id=shown.ad_id, model_version=model.version, event_time_ms=int(request.event_time_ms),
                features=features_i, pctr=shown.pctr, pcvr=shown.pcvr, advertiser_id=shown.advertiser_id,
                campaign_id=shown.campaign_id, category_id=shown.category_id, placement=request.placement,
                device=request.device, position=slot, bid=shown.bid, feature_lists=lists_i, ecpm=shown.ecpm,
                price=shown.price, explored=shown.explored, arm=out.arm, read_ms=read_ms,
                ad_read_ms=int(features.read_ms["ad"][i]), advertiser_read_ms=int(features.read_ms["advertiser"][i]),
                ad_checked_ms=int(features.read_ms["checked"][i]) if "checked" in features.read_ms else -1))
        if out.logs:
            self.logger.log(out.logs)
        out.ranked = rows
        out.timings = {"features": (t1 - t0) * 1000, "encode": (t2 - t1) * 1000, "prerank": (t_pre - t2) * 1000,
                       "model": (t3 - t_pre) * 1000,
                       "auction": (t4 - t3) * 1000, "log": (clock() - t4) * 1000}

    def _prerank(self, model: ScoringModel, batch: Batch, bids: np.ndarray, impressions: np.ndarray,
                 eligible: np.ndarray, request_id: str) -> np.ndarray | None:
        """The request rows the ranker scores (sorted), or None for every row: the funnel's top ``rank_top_k`` by
        estimated eCPM among the ``eligible`` (a campaign at its frequency cap cannot win: ranking it would take
        a place of one that can), plus every new ad when the request explores (exploration must see them)."""
        k = self.settings.serving.rank_top_k
        funnel = self._funnel_for(model) if 0 < k < len(bids) else None
        if funnel is None:
            return None
        s = self.settings.serving
        new = (np.nan_to_num(impressions) < s.new_ad_impressions) if explores(request_id, s.explore_share) else None
        return funnel.top(batch, bids, k, s.quality_exponent, must=new, eligible=eligible)

    def _cap_left(self, key: str, campaigns: np.ndarray) -> np.ndarray:
        """Impressions each candidate's campaign may still get for this user today. One ``HGETALL`` of the user's
        day hash: it holds only the campaigns the user saw today, far fewer fields than an ``HMGET`` of every
        candidate's campaign would send and parse (0.05 ms instead of 0.25 ms for 500 candidates)."""
        cap = self.settings.serving.frequency_cap
        if cap <= 0:
            return np.full(len(campaigns), NO_CAP, dtype=np.int64)
        seen = self.redis.hgetall(key)
        if not seen:
            return np.full(len(campaigns), cap, dtype=np.int64)
        counts = {int(k): int(v) for k, v in seen.items()}
        return np.array([cap - counts.get(c, 0) for c in campaigns.tolist()], dtype=np.int64)

    # -- metrics -----------------------------------------------------------------------------------------------

    def _record(self, out: Served, n: int, ms: float) -> None:
        with self._stats_lock:
            self.requests += 1
            self.candidates += n
            self.shown += len(out.shown)
            self.explored += sum(s.explored for s in out.shown)
            self._latency.append(ms)
            self._versions[out.model.version] += 1
            self._arms[out.arm] += 1

    def metrics(self) -> dict:
        """Counters, latency over the last requests, versions and arms served, reloads, the logger's counters."""
        with self._stats_lock:
            latency = np.array(self._latency)
            out = {"requests": self.requests, "candidates": self.candidates, "shown": self.shown,
                   "explored": self.explored, "versions_served": dict(self._versions), "arms": dict(self._arms)}
        out["latency_ms"] = ({"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                              "mean": float(latency.mean()), "window": len(latency)} if len(latency) else {})
        out.update(model_version=self.model_version, pinned_versions=self.pinned_versions, reloads=self.reloads,
                   reload_failures=self.reload_failures, reader_staleness_s=self.reader.staleness_s,
                   logger=self.logger.stats() if self.logger is not None else {})
        return out
