"""The scorer against the real Redis, Kafka and a registry under tmp_path: logged features are the served ones,
models swap without a failed request, scoring goes on while Kafka is down, frequency caps hold."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import torch

from feature_repo.online import OnlineReader, OnlineWriter
from infra.settings import Settings
from schemas.codec import decode
from schemas.events import PredictionLog
from schemas.features import ALL_TABLES, N_CATEGORIES, AdFeatures
from streams.serving.prediction_log import PredictionLogger
from streams.serving.request_features import frame_from_logs
from streams.serving.scorer import AdRequest, Scorer, score_batch
from tests.conftest import consume_all
from tests.test_auction import assert_same_batch
from tests.test_online_store import random_row
from trainers.calibration import Calibrator
from trainers.data import HISTORY_COLUMN, PROFILE_COLUMN, InputSpec, encode
from trainers.model import Ranker
from trainers.registry import Registry
from trainers.scoring import ScoringModel, load, save

DAY_MS = 24 * 3600 * 1000
T0 = (int(time.time() * 1000) // DAY_MS - 1) * DAY_MS + DAY_MS // 2  # noon UTC yesterday (topic retention is by time)
N_USERS, N_ADS, NO_ROW = 6, 240, 220  # ads from NO_ROW on have no feature rows (brand new)


def serving_settings(base: Settings, tmp_path, **serving) -> Settings:
    """``base`` with its own var dir, Feast project (Redis keys), a small model and the given serving settings."""
    return base.model_copy(update={
        "var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}",
        "trainer": base.trainer.model_copy(update={"id_buckets": 1009, "small_buckets": 101, "embedding_dim": 4}),
        "serving": base.serving.model_copy(update={"reload_every_s": 0.1, **serving})})


def catalog(ad: int) -> tuple[int, int, int]:
    """(campaign, advertiser, category) of an ad, as the ad server's catalog knows them."""
    return ad // 4, ad // 20, ad % N_CATEGORIES


def fill_store(settings: Settings, seed: int = 0) -> None:
    """Feature rows of every user, every ad below NO_ROW and their advertisers; half the user x category crosses."""
    writer, rng = OnlineWriter(settings), random.Random(seed)
    ts = datetime.fromtimestamp((T0 - 3_600_000) / 1000, UTC)  # an hour before the requests: within every TTL
    for table in ALL_TABLES:
        if table.ENTITIES == ("user_id",):
            keys = [{"user_id": u} for u in range(N_USERS)]
        elif table.ENTITIES == ("user_id", "category_id"):
            keys = [{"user_id": u, "category_id": c} for u in range(N_USERS) for c in range(0, N_CATEGORIES, 2)]
        elif table.ENTITIES == ("ad_id",):
            keys = [{"ad_id": a} for a in range(NO_ROW)]
        else:
            keys = [{"advertiser_id": v} for v in range(NO_ROW // 20)]
        rows = [random_row(table, k, rng, ts) for k in keys]
        if table is AdFeatures:
            for row in rows:
                campaign, advertiser, category = catalog(row["ad_id"])
                row.update(ad_campaign_id=campaign, ad_advertiser_id=advertiser, ad_category_id=category)
        writer.write(table, rows)


def register(registry: Registry, settings: Settings, seed: int, promote: bool = True) -> str:
    torch.manual_seed(seed)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    model = Ranker.from_settings(spec, settings.trainer)
    rng = np.random.default_rng(seed)  # calibrators and downsampling undone: the whole scoring path runs
    p = rng.uniform(0.01, 0.5, 2000)
    calibrators = {task: Calibrator("platt").fit(p, rng.random(2000) < p / 2) for task in ("ctr", "cvr")}
    version = save(registry, ScoringModel(model, negative_rate=0.5, calibrators=calibrators), "full", {"seed": seed})
    if promote:
        registry.promote(version, f"test seed {seed}")
    return version


def request(rid: str, user: int, ads: list[int], event_time_ms: int = T0, slots: int = 3,
            bids: list[float] | None = None) -> AdRequest:
    cat = [catalog(a) for a in ads]
    return AdRequest(rid, user, "feed", "mobile", event_time_ms, slots, ads, [c[0] for c in cat],
                     [c[1] for c in cat], [c[2] for c in cat], bids or [1.0 + (a % 7) / 2 for a in ads])


def random_requests(n: int, seed: int, candidates: int = 80) -> list[AdRequest]:
    rng = random.Random(seed)
    return [request(f"r{seed}-{i}", rng.randrange(N_USERS), rng.sample(range(N_ADS), candidates),
                    T0 + i * 1000) for i in range(n)]


def test_logged_features_equal_served_features(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path, explore_share=0.5, frequency_cap=1000)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    version = register(registry, settings, seed=1)
    logger = PredictionLogger(settings, spool_dir=tmp_path / "spool").start()
    reader = OnlineReader(settings)  # not started: a test reads a store nobody writes to
    scorer = Scorer(settings, registry, reader=reader, logger=logger, threads=1).start()
    try:
        served = [scorer.serve(r) for r in random_requests(12, seed=2)]
        assert logger.flush(30)
    finally:
        scorer.close()
        logger.close()
    by_impression = {}
    for s in served:
        assert len(s.shown) == 3 and [x.position for x in s.shown] == [0, 1, 2]
        for shown, row in zip(s.shown, s.ranked[s.auction.winners].tolist(), strict=True):
            by_impression[shown.impression_id] = (s, row)
    records = consume_all(settings, settings.topics.prediction_log, len(by_impression))
    logged = {}
    for rec in records:
        log = decode(PredictionLog, rec.value, rec.headers)
        assert rec.key.decode() == log.impression_id
        logged[log.impression_id] = log
    assert set(logged) == set(by_impression)

    store = OnlineReader(settings)
    for impression, (s, row) in by_impression.items():
        log = logged[impression]
        # What the scorer encoded for this candidate, and what the store holds (read again, independently).
        assert (log.features, log.feature_lists) == s.encoded.logged(row)
        # Read as the scorer reads: at the request's time, with the categories and advertisers the request names
        # (an ad with no gold row yet gets its user x category row from the request's category).
        feast = store.features(s.request.user_id, [s.request.ad_ids[row]], as_of_ms=s.request.event_time_ms,
                               category_ids=[s.request.category_ids[row]],
                               advertiser_ids=[s.request.advertiser_ids[row]]).to_feast_dict()
        want = {c: float(feast[c][0]) for c in s.encoded.columns if feast.get(c, [None])[0] is not None}
        assert log.features == want
        assert log.feature_lists == {c: [float(x) for x in v[0]] for c, v in feast.items() if isinstance(v[0], list)}
        assert {HISTORY_COLUMN, PROFILE_COLUMN} <= set(log.feature_lists) or s.request.user_id >= NO_ROW
        # Every scalar column of the training set is logged, ids included (the replay set had no campaign).
        assert log.ad_id >= NO_ROW or "ad_features__ad_campaign_id" in log.features
        assert (log.model_version, log.pctr, log.arm) == (version, s.shown[log.position].pctr, "all")
        assert log.ad_id >= NO_ROW or "ad_features__ad_ctr_7d" in log.features
    new_ad_logs = [x for x in logged.values() if x.ad_id >= NO_ROW]
    assert all(not any(k.startswith("ad_") for k in x.features) for x in new_ad_logs)

    # Replay: the logged rows encode to the served batch and score the same with the same version.
    model = load(registry, version)
    for s in served:  # the scorer's lean path is the model's own scoring
        with torch.inference_mode():
            full = model.score(s.encoded.batch)
        lean = score_batch(model, s.encoded.batch, torch.device("cpu"))
        for task in ("ctr", "cvr", "ctcvr", "neg"):
            assert np.allclose(lean[task], full[task], rtol=0, atol=1e-9), task
        assert np.array_equal(lean["ctr"], s.scores["ctr"])
    for s in served:
        rows = s.ranked[s.auction.winners].tolist()
        logs = [logged[x.impression_id] for x in s.shown]
        replay = encode(frame_from_logs(logs, scoring=True), model.model.spec)
        assert_same_batch(replay, s.encoded.batch.slice(torch.tensor(rows)))
        with torch.inference_mode():
            again = model.score(replay)
        assert np.allclose(again["ctr"], [x.pctr for x in logs], rtol=0, atol=1e-6)
        assert np.allclose(again["cvr"], [x.pcvr for x in logs], rtol=0, atol=1e-6)


def test_models_swap_without_dropping_a_request(fresh_topics, tmp_path):
    # No frequency cap: 6 users x 60 campaigns x 5 a day run out after ~600 requests, and a machine that serves
    # faster (or registers models slower) sends more than that while the swaps happen, so "no winner" was the cap.
    settings = serving_settings(fresh_topics, tmp_path, frequency_cap=0)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    versions = [register(registry, settings, seed=10)]
    logger = PredictionLogger(settings, spool_dir=tmp_path / "spool").start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    answers: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        reqs = random_requests(10_000, seed=3, candidates=50)
        for r in reqs:
            if stop.is_set():
                return
            try:
                shown = scorer.score(r)
                assert shown, "no winner"
                answers.append((time.monotonic(), shown[0].model_version))
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for seed in (11, 12, 13):
            time.sleep(0.4)
            versions.append(register(registry, settings, seed=seed))
        promoted_at = time.monotonic()
        time.sleep(1.5)  # fifteen reload periods
        stop.set()
        thread.join()
    finally:
        stop.set()
        scorer.close()
        logger.close()
    assert not errors, errors[:1]
    assert len(answers) > 20
    assert {v for _, v in answers} <= set(versions)
    late = [v for t, v in answers if t > promoted_at + 1.0]
    assert late and set(late) == {versions[-1]}
    assert scorer.metrics()["reloads"] >= 1


def test_unloadable_promotion_is_skipped(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path, reload_every_s=3600.0)  # reload() called by the test
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    first = register(registry, settings, seed=20)
    logger = PredictionLogger(settings, spool_dir=tmp_path / "spool").start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    try:
        broken = register(registry, settings, seed=21)  # promoted, then damaged on disk before the scorer loads it
        blob = registry.versions_dir / broken / "model.safetensors"
        data = bytearray(blob.read_bytes())
        data[-5] ^= 0xFF
        blob.write_bytes(bytes(data))
        assert scorer.reload() is False and scorer.model_version == first
        assert scorer.score(request("after-broken", 1, list(range(30))))[0].model_version == first
        assert scorer.reload() is False  # not retried until promoted again
        good = register(registry, settings, seed=22)
        assert scorer.reload() is True and scorer.model_version == good
        m = scorer.metrics()
        assert (m["reloads"], m["reload_failures"]) == (1, 1)
    finally:
        scorer.close()
        logger.close()


def test_scoring_goes_on_while_kafka_is_down(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    register(registry, settings, seed=30)
    dead = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})})
    spool = tmp_path / "spool"
    logger = PredictionLogger(dead, spool_dir=spool).start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    shown = []
    try:
        for r in random_requests(20, seed=4):
            got = scorer.score(r)
            assert len(got) == 3
            shown += [s.impression_id for s in got]
        deadline = time.monotonic() + 30
        while logger.stats()["spooled"] < len(shown) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = scorer.metrics()["logger"]
        assert stats["spooled"] == len(shown) and stats["sent"] == 0 and stats["dropped"] == 0
    finally:
        scorer.close()
        logger.close(timeout_s=5)
    again = PredictionLogger(settings, spool_dir=spool).start()  # Kafka reachable: the spool drains
    try:
        assert again.flush(30)
    finally:
        again.close()
    records = consume_all(settings, settings.topics.prediction_log, len(shown))
    assert {decode(PredictionLog, r.value, r.headers).impression_id for r in records} == set(shown)


def test_frequency_cap_holds_for_the_day(fresh_topics, tmp_path):
    cap = 3
    settings = serving_settings(fresh_topics, tmp_path, frequency_cap=cap, explore_share=0.0)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    register(registry, settings, seed=40)
    logger = PredictionLogger(settings, spool_dir=tmp_path / "spool").start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    ads = list(range(40))  # campaign 0 = ads 0..3, bidding far above everyone else
    bids = [1000.0 if catalog(a)[0] == 0 else 1.0 for a in ads]
    try:
        winners = [scorer.score(request(f"cap-{i}", 2, ads, T0 + i * 60_000, 1, bids))[0].campaign_id
                   for i in range(cap + 3)]
        assert winners[:cap] == [0] * cap and 0 not in winners[cap:]
        other_user = scorer.score(request("cap-other", 3, ads, T0, 1, bids))[0]
        next_day = scorer.score(request("cap-next-day", 2, ads, T0 + DAY_MS, 1, bids))[0]
        assert other_user.campaign_id == 0 and next_day.campaign_id == 0
        two_slots = scorer.score(request("cap-two", 4, ads, T0, cap + 2, bids))
        assert [s.campaign_id for s in two_slots].count(0) == cap  # within one request too
    finally:
        scorer.close()
        logger.close()


def test_ab_arms_get_their_model_versions(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path)
    fill_store(settings)
    registry = Registry(settings.registry_dir)
    pinned = register(registry, settings, seed=60)
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={
        "buckets": 2, "experiment": {"old": (0, 1, pinned), "new": (1, 2, "promoted")}})})
    logger = PredictionLogger(settings, spool_dir=tmp_path / "spool").start()
    scorer = Scorer(settings, registry, reader=OnlineReader(settings), logger=logger, threads=1).start()
    try:
        promoted = register(registry, settings, seed=61)
        assert scorer.reload() and scorer.pinned_versions == [pinned]
        arms = {}
        for user in range(N_USERS):
            served = scorer.serve(request(f"ab-{user}", user, list(range(40))))
            arms[served.arm] = {s.model_version for s in served.shown} | {x.model_version for x in served.logs}
            assert {x.arm for x in served.logs} == {served.arm}
        assert arms == {"old": {pinned}, "new": {promoted}}  # both arms have users among these six
        by_arm = Counter(scorer.experiment.arm_of(u)[0] for u in range(N_USERS))
        assert scorer.metrics()["arms"] == dict(by_arm)
    finally:
        scorer.close()
        logger.close()
