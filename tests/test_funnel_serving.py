"""The funnel against the real Redis, Kafka and a registry: the ad server's candidate retrieval (the promoted
towers over the live ads, bid-aware, rebuilt when the catalog or the towers change), then in the scorer the
pre-ranker stored with a version picks the rows the ranker scores, the ranker's scores of those rows are the full
path's, the winners are the ones the ranker on every candidate picks, and an exploring request keeps every new
ad."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import torch

from feature_repo.online import OnlineReader
from streams.serving.prediction_log import PredictionLogger
from streams.serving.retrieval import Retriever
from streams.serving.scorer import Scorer
from streams.simulator.closed_loop import ClosedLoop, EveryAd
from streams.simulator.config import SimulatorConfig
from tests.test_scorer import NO_ROW, fill_store, random_requests, register, serving_settings
from trainers import preranker
from trainers.data import InputSpec, concat
from trainers.model import Ranker
from trainers.registry import Registry, module_bytes
from trainers.retrieval import EXTRA_FILE as RETRIEVAL_FILE
from trainers.retrieval import TwoTower
from trainers.scoring import ScoringModel, save

K = 20


def serve_all(settings, registry, requests, tmp_path, name):
    logger = PredictionLogger(settings, spool_dir=tmp_path / name).start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    try:
        return [scorer.serve(r) for r in requests]
    finally:
        scorer.close()
        logger.close()


def funnel_version(settings, registry, tmp_path) -> tuple[str, list]:
    """A ranker and a pre-ranker distilled from it on the encoded batches of 30 served requests (the serving
    distribution, features from the store), registered and promoted; and the full path's serving of 30 others."""
    torch.manual_seed(3)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    scoring = ScoringModel(Ranker.from_settings(spec, settings.trainer))
    plain = save(registry, scoring, "full", {"seed": 3})
    registry.promote(plain, "the ranker alone")
    full = settings.model_copy(update={"serving": settings.serving.model_copy(update={"rank_top_k": 0})})
    served = serve_all(full, registry, random_requests(60, seed=8), tmp_path, "full")
    pre = preranker.distil(scoring, concat([s.encoded.batch for s in served[:30]]), progress=False)
    version = save(registry, scoring, "full", {"seed": 3, "preranker": {"config": pre.config}},
                   extra={preranker.EXTRA_FILE: module_bytes(pre)})
    registry.promote(version, "with its pre-ranker")
    return version, served[30:]


def test_the_scorer_ranks_the_pre_rankers_top_k_and_shows_what_the_full_ranker_shows(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path, rank_top_k=K, frequency_cap=1000, explore_share=0.0)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    register(registry, settings, seed=1)  # a version without a pre-ranker: every candidate ranked
    plain = serve_all(settings, registry, random_requests(3, seed=9), tmp_path, "plain")
    assert all(len(s.ranked) == len(s.request.ad_ids) for s in plain)

    version, full = funnel_version(settings, registry, tmp_path)
    served = serve_all(settings, registry, [s.request for s in full], tmp_path, "funnel")
    same = 0
    for f, s in zip(full, served, strict=True):
        assert s.model.version == version and len(s.ranked) == K and len(s.request.ad_ids) == 80
        assert {x.ad_id for x in s.shown} <= {s.request.ad_ids[i] for i in s.ranked.tolist()}
        for task in ("ctr", "cvr", "neg"):  # the ranker's scores of the ranked rows are the full path's (float32
            assert np.allclose(s.scores[task], f.scores[task][s.ranked], rtol=0, atol=1e-6), task  # of a batch)
        same += [x.ad_id for x in s.shown] == [x.ad_id for x in f.shown]
    assert same >= 0.9 * len(full), same  # distilled on other requests of the same traffic


def test_an_exploring_request_ranks_every_new_ad(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path, rank_top_k=K, frequency_cap=1000, explore_share=1.0)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    funnel_version(settings, registry, tmp_path)
    for s in serve_all(settings, registry, random_requests(10, seed=10), tmp_path, "explore"):
        new = [i for i, a in enumerate(s.request.ad_ids) if a >= NO_ROW]  # no feature rows: no impressions yet
        assert new and set(new) <= set(s.ranked.tolist()) and len(s.ranked) >= K


def towers_version(settings, registry: Registry, seed: int = 4) -> str:
    """A promoted version whose retrieval towers are untrained (retrieval's mechanics do not need trained ones)."""
    torch.manual_seed(seed)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    towers = TwoTower(spec, embedding_dim=8, hidden=16, out_dim=8)
    version = save(registry, ScoringModel(Ranker.from_settings(spec, settings.trainer)), "full",
                   {"retrieval": {"config": towers.config}}, extra={RETRIEVAL_FILE: module_bytes(towers)})
    registry.promote(version, "towers")
    return version


def test_the_ad_server_retrieves_each_requests_candidates_from_the_live_ads(redis_settings, tmp_path):
    settings = serving_settings(redis_settings, tmp_path)
    registry = Registry(settings.registry_dir)
    towers_version(settings, registry)
    cfg = SimulatorConfig(seed=6, start=datetime(2026, 11, 20, tzinfo=UTC), hours=2, users=800, ads=300,
                          impressions_per_hour=400)
    retriever = Retriever(registry, OnlineReader(settings), k=40)
    loop = ClosedLoop(cfg, settings, source=retriever)
    peer = ClosedLoop(cfg, settings, source=EveryAd())
    ads = loop.live_ads(0)
    ours, theirs = loop.requests(0), peer.requests(0)
    # The same requests (users, context, times) whatever the source; retrieval names 40 of the live ads.
    assert [(r.user_id, r.placement, r.event_time_ms) for r in ours] == [
        (r.user_id, r.placement, r.event_time_ms) for r in theirs]
    assert all(len(r.ad_ids) <= 40 and set(r.ad_ids.tolist()) <= set(ads["ad_id"]) for r in ours)
    assert max(len(r.ad_ids) for r in theirs) > 40
    # Bids count: an ad whose campaign bids 1e6 times more is every request's candidate.
    rich = ads.assign(bid=np.where(np.arange(len(ads)) == 7, 1e6, ads["bid"]))
    retriever.for_hour(rich)
    assert all(7 in retriever.candidates(r.user_id, r.placement, r.device, r.event_time_ms) for r in ours[:20])
    # The index is rebuilt for another catalog or other towers, not for the same catalog again.
    built = retriever.rebuilds
    retriever.for_hour(rich)
    assert retriever.rebuilds == built
    retriever.for_hour(loop.live_ads(1).iloc[:250])
    assert retriever.rebuilds == built + 1
    towers_version(settings, registry, seed=5)
    retriever.for_hour(loop.live_ads(1).iloc[:250])
    assert retriever.rebuilds == built + 2
    # A promoted version without towers (a bad push, an older model) leaves the current towers serving.
    serving = retriever.towers_of
    register(registry, settings, seed=2)
    retriever.for_hour(loop.live_ads(1))
    assert retriever.towers_of == serving and retriever.rebuilds == built + 3  # another catalog: rebuilt
    assert len(retriever.candidates(1, "feed", "ios", cfg.start_ms)) == 40


def test_the_graph_index_retrieves_what_exhaustive_scoring_does(redis_settings, tmp_path):
    settings = serving_settings(redis_settings, tmp_path)
    registry = Registry(settings.registry_dir)
    towers_version(settings, registry)
    cfg = SimulatorConfig(seed=6, start=datetime(2026, 11, 20, tzinfo=UTC), hours=1, users=800, ads=2_000,
                          impressions_per_hour=400)
    ads = ClosedLoop(cfg, settings).live_ads(0)
    # Bids off: the graph's search against every ad scored by the towers (with bids, the graph's side re-ranks its
    # 4k nearest by cosine: an ad far in cosine with an outsized bid is missed, by design).
    exact = Retriever(registry, OnlineReader(settings), k=100, bid_weight=0.0)
    graph = Retriever(registry, OnlineReader(settings), k=100, exact_below=0, bid_weight=0.0)
    exact.for_hour(ads)
    graph.for_hour(ads)
    assert exact.index.hnsw is None and graph.index.hnsw is not None
    overlap = [len(set(exact.candidates(u, "feed", "ios", 0)) & set(graph.candidates(u, "feed", "ios", 0))) / 100
               for u in range(30)]
    assert np.mean(overlap) >= 0.95, overlap
