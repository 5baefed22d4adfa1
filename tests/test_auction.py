"""The auction, the A/B buckets and the request encoder: pure logic, no services."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from feature_repo.online import RequestFeatures, view_fields
from infra.settings import Settings
from schemas.events import PredictionLog
from schemas.features import N_CATEGORIES
from streams.serving.auction import ecpm, explores, run_auction, thompson_pctr
from streams.serving.experiment import ALL, PROMOTED, REST, Experiment, bucket
from streams.serving.request_features import encode_request, frame_from_logs, request_frame
from trainers.data import HISTORY_COLUMN, PROFILE_COLUMN, InputSpec, encode

SPEC = InputSpec.from_schemas(id_buckets=1009, small_buckets=101)


def candidates(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"bids": rng.uniform(0.5, 5, n), "pctr": rng.uniform(0.001, 0.2, n), "pcvr": rng.uniform(0.01, 0.3, n),
            "pneg": rng.uniform(0, 0.2, n), "ad_ids": np.arange(n) + 1000, "campaign_ids": np.arange(n) // 2}


def auction(c: dict, **kw):
    return run_auction(c["bids"], c["pctr"], c["pcvr"], c["pneg"], ad_ids=c["ad_ids"],
                       campaign_ids=c["campaign_ids"], **kw)


# -- ranking and pricing ----------------------------------------------------------------------------------------


def test_winners_are_the_top_ecpm_in_order():
    c = candidates(200)
    r = auction(c, slots=5)
    e = ecpm(c["bids"], c["pctr"], c["pcvr"], c["pneg"])
    assert r.winners.tolist() == np.argsort(-e)[:5].tolist()
    assert np.allclose(r.ecpm, e[r.winners]) and (np.diff(r.ecpm) <= 0).all()
    assert not r.explored.any()


def test_gsp_price_is_the_least_bid_that_keeps_the_rank():
    c = candidates(300, seed=1)
    r = auction(c, slots=4, quality_exponent=2.0)
    e = ecpm(c["bids"], c["pctr"], c["pcvr"], c["pneg"], 2.0)
    ranked = np.sort(e)[::-1]
    q = (1 - c["pneg"]) ** 2.0
    for k, i in enumerate(r.winners):
        assert r.price[k] <= c["bids"][i]
        at_price = 1000 * r.price[k] * c["pctr"][i] * c["pcvr"][i] * q[i]
        assert at_price == pytest.approx(ranked[k + 1], rel=1e-9)  # at the price it ties the next one
        assert 1000 * r.price[k] * (1 - 1e-6) * c["pctr"][i] * c["pcvr"][i] * q[i] < ranked[k + 1]


def test_reserve_excludes_and_floors_the_price():
    c = candidates(50, seed=2)
    e = ecpm(c["bids"], c["pctr"], c["pcvr"], c["pneg"])
    reserve = float(np.sort(e)[-3])  # only the top 3 clear it
    r = auction(c, slots=5, reserve_ecpm=reserve)
    assert len(r.winners) == 3 and (e[r.winners] >= reserve).all()
    last = r.winners[-1]  # no eligible runner-up: it pays the reserve
    assert 1000 * r.price[-1] * c["pctr"][last] * c["pcvr"][last] * (1 - c["pneg"][last]) == pytest.approx(reserve)
    # One candidate alone: it pays the reserve, never above its bid.
    one = run_auction(np.array([2.0]), np.array([0.1]), np.array([0.1]), np.zeros(1), ad_ids=np.array([1]), slots=1,
                      reserve_ecpm=10.0)
    assert one.price.tolist() == [1.0]
    high = run_auction(np.array([2.0]), np.array([0.1]), np.array([0.1]), np.zeros(1), ad_ids=np.array([1]),
                       slots=1, reserve_ecpm=25.0)
    assert high.winners.tolist() == []


def test_price_never_above_bid_when_a_sample_outranks_its_bid():
    c = candidates(100, seed=3)
    r = auction(c, slots=3, request_id="r1", explore_share=1.0, new_ad_impressions=10**9,
                impressions=np.zeros(100), clicks=np.zeros(100), prior_strength=1.0)
    assert (r.price <= c["bids"][r.winners] + 1e-12).all()


def test_no_ad_twice_and_capped_campaigns_never_win():
    c = candidates(40, seed=4)
    c["ad_ids"] = np.repeat(np.arange(20), 2)  # every ad twice (two line items of one ad)
    r = auction(c, slots=6)
    assert len(set(c["ad_ids"][r.winners].tolist())) == 6
    e = ecpm(c["bids"], c["pctr"], c["pcvr"], c["pneg"])
    top_campaign = int(c["campaign_ids"][np.argmax(e)])
    cap_left = np.where(c["campaign_ids"] == top_campaign, 0, 5)
    capped = auction(c, slots=6, cap_left=cap_left)
    assert top_campaign not in c["campaign_ids"][capped.winners].tolist()
    # One impression left: at most one of its ads wins in this request.
    one_left = auction(c, slots=6, cap_left=np.where(c["campaign_ids"] == top_campaign, 1, 5))
    assert c["campaign_ids"][one_left.winners].tolist().count(top_campaign) == 1


# -- exploration --------------------------------------------------------------------------------------------------


def test_exploration_share_is_deterministic_and_bounded():
    ids = [f"req-{i}" for i in range(20_000)]
    share = np.mean([explores(i, 0.05) for i in ids])
    assert abs(share - 0.05) < 4 * math.sqrt(0.05 * 0.95 / len(ids))
    assert [explores(i, 0.05) for i in ids[:500]] == [explores(i, 0.05) for i in ids[:500]]
    assert not any(explores(i, 0.0) for i in ids[:500]) and all(explores(i, 1.0) for i in ids[:500])
    c = candidates(100, seed=5)
    kw = dict(slots=3, explore_share=1.0, new_ad_impressions=100, impressions=np.zeros(100), clicks=np.zeros(100))
    a, b = auction(c, request_id="same", **kw), auction(c, request_id="same", **kw)
    assert a.winners.tolist() == b.winners.tolist() and a.pctr.tolist() == b.pctr.tolist()


def test_exploration_samples_only_new_ads():
    c = candidates(60, seed=6)
    impressions = np.where(np.arange(60) % 2 == 0, 0, 1_000)  # even rows are new
    c["pctr"][:] = 0.01
    explored = 0
    for k in range(200):
        r = auction(c, slots=10, request_id=f"r{k}", explore_share=1.0, new_ad_impressions=100,
                    impressions=impressions, clicks=np.zeros(60), prior_strength=5.0)
        old = impressions[r.winners] >= 100
        assert np.array_equal(r.pctr[old], c["pctr"][r.winners][old])  # established ads: the model's pCTR
        assert not r.explored[old].any()
        explored += int(r.explored.sum())
    assert explored > 0  # a wide prior puts some new ads in slots the greedy auction gave others
    none = auction(c, slots=10, request_id="r0", explore_share=0.0, new_ad_impressions=100, impressions=impressions)
    assert not none.exploring and not none.explored.any()


def test_thompson_posterior_concentrates_with_impressions():
    rng = np.random.default_rng(0)
    few = thompson_pctr(np.full(5000, 0.05), np.zeros(5000), np.zeros(5000), 50.0, rng)
    many = thompson_pctr(np.full(5000, 0.05), np.full(5000, 100_000), np.full(5000, 2_000), 50.0, rng)
    assert abs(few.mean() - 0.05) < 0.003 and few.std() > 5 * many.std()
    assert abs(many.mean() - 0.02) < 0.001  # the ad's own rate wins over the prior


# -- A/B buckets --------------------------------------------------------------------------------------------------


def test_bucket_is_a_stable_hash():
    want = int.from_bytes(hashlib.blake2b(b"ab1:12345", digest_size=8).digest(), "little") % 1000
    assert bucket(12345, "ab1", 1000) == want
    counts = np.bincount([bucket(u, "s", 10) for u in range(20_000)], minlength=10)
    assert counts.min() > 1_800 and counts.max() < 2_200


def test_arms_from_settings():
    settings = Settings()
    exp = Experiment.from_settings(settings.model_copy(update={"serving": settings.serving.model_copy(update={
        "experiment": {"control": (0, 100, "promoted"), "treatment": (100, 200, "v000003-warm")}})}))
    arms = {}
    for u in range(5000):
        arm, version = exp.arm_of(u)
        b = bucket(u, settings.serving.experiment_salt, settings.serving.buckets)
        want = ("control", PROMOTED) if b < 100 else ("treatment", "v000003-warm") if b < 200 else (REST, PROMOTED)
        assert (arm, version) == want
        arms[arm] = arms.get(arm, 0) + 1
    assert set(arms) == {"control", "treatment", REST} and exp.pinned_versions() == ["v000003-warm"]
    assert Experiment({}, 1000, "x").arm_of(7) == (ALL, PROMOTED)


@pytest.mark.parametrize("arms, message", [
    ({"a": (0, 600, "promoted"), "b": (500, 1000, "promoted")}, "overlap"),
    ({"a": (900, 1200, "promoted")}, "outside"),
    ({"a": (5, 5, "promoted")}, "empty"),
    ({"all": (0, 10, "promoted")}, "reserved"),
    ({"a": (0, 10)}, "must be"),
])
def test_bad_experiments_are_refused(arms, message):
    with pytest.raises(ValueError, match=message):
        Experiment(arms, 1000, "s")


# -- request encoding ---------------------------------------------------------------------------------------------


def request_features(n: int, seed: int = 0) -> tuple[RequestFeatures, dict]:
    """A request's features as the read path returns them, with missing values everywhere."""
    rng = np.random.default_rng(seed)
    ad_ids = (rng.permutation(10_000)[:n] + 1).tolist()
    values, present = {}, {}
    for name, _, kind in view_fields(("ad_features", "ad_realtime", "advertiser_features", "advertiser_realtime")):
        if kind is int:
            values[name] = rng.integers(0, 5000, n) if not name.endswith("category_id") else rng.integers(0, 16, n)
        else:
            values[name] = rng.uniform(0, 1, n)
        present[name] = rng.random(n) > 0.1
    user = {}
    for name, _, kind in view_fields(("user_features", "user_realtime")):
        if kind is int:
            user[name] = int(rng.integers(0, 100))
        elif kind is float:
            user[name] = float(rng.uniform())
        elif name == PROFILE_COLUMN:
            user[name] = rng.dirichlet(np.ones(N_CATEGORIES)).tolist()
        else:
            user[name] = rng.integers(0, 10**11, 25).tolist()
    user["user_features__user_clicks_7d"] = None  # a missing user value
    cross = {name: [None if rng.random() < 0.3 else (float(rng.uniform()) if kind is float else int(rng.integers(50)))
                    for _ in range(n)] for name, _, kind in view_fields(("user_category_features",))}
    features = RequestFeatures(77, ad_ids, values, present, user, cross)
    context = {"placement": "feed", "device": "mobile", "campaign_ids": (np.array(ad_ids) // 3).tolist(),
               "advertiser_ids": (np.array(ad_ids) // 30).tolist(),
               "category_ids": [int(c) if i % 17 else -1 for i, c in enumerate(values["ad_features__ad_category_id"])]}
    return features, context


def assert_same_batch(a, b) -> None:
    for name in ("sparse", "dense", "history", "position", "label_ctr", "label_ctcvr", "label_neg", "weight",
                 "clicked", "ctr_weight"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(torch.isnan(x), torch.isnan(y)) if x.is_floating_point() else True, name
        assert torch.equal(torch.nan_to_num(x, nan=-7.0), torch.nan_to_num(y, nan=-7.0)), name


def test_encode_request_equals_encode_of_the_frame():
    features, context = request_features(300)
    enc = encode_request(SPEC, features, **context)
    assert torch.isnan(enc.batch.dense).any()  # missing values are there, and must land on the same cells
    assert_same_batch(enc.batch, encode(request_frame(features, **context), SPEC))
    # Without a profile or a history, and with no candidates at all.
    features.user[PROFILE_COLUMN] = features.user[HISTORY_COLUMN] = None
    assert_same_batch(encode_request(SPEC, features, **context).batch,
                      encode(request_frame(features, **context), SPEC))
    empty = RequestFeatures(1, [], {k: v[:0] for k, v in features.ad_values.items()},
                            {k: v[:0] for k, v in features.ad_present.items()}, features.user,
                            {k: [] for k in features.cross})
    assert len(encode_request(SPEC, empty, placement="feed", device="mobile", campaign_ids=[], advertiser_ids=[],
                              category_ids=[]).batch) == 0


def test_logged_features_replay_to_the_served_batch():
    features, context = request_features(120, seed=3)
    enc = encode_request(SPEC, features, **context)
    rows = [5, 0, 119, 64]
    records = []
    for position, i in enumerate(rows):
        scalars, lists = enc.logged(i)
        assert set(lists) >= {HISTORY_COLUMN, PROFILE_COLUMN}  # every list feature the store had
        assert "user_features__user_clicks_7d" not in scalars  # missing: absent, not 0 or NaN
        record = PredictionLog(
            request_id="r", impression_id=f"r-{position}", user_id=features.user_id, ad_id=features.ad_ids[i],
            model_version="v1", event_time_ms=1, features=scalars, pctr=0.1, pcvr=0.1,
            advertiser_id=context["advertiser_ids"][i], campaign_id=context["campaign_ids"][i],
            category_id=context["category_ids"][i], placement="feed", device="mobile", position=position, bid=1.0,
            feature_lists=lists)
        records.append(PredictionLog.model_validate_json(record.model_dump_json()))  # through JSON, as on Kafka
    replay = encode(frame_from_logs(records, scoring=True), SPEC)
    assert_same_batch(replay, enc.batch.slice(torch.tensor(rows)))
    trained = encode(frame_from_logs(records), SPEC)
    assert trained.position.tolist() == [0, 1, 2, 3]  # for training: the slot each was shown in
