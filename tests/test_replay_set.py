"""Log-and-replay against real Kafka, Spark and Delta: prediction-log records and impression events go through
bronze and silver; the replay set holds exactly the logged rows joined to their matured labels (first arrival
of a repeated record, no unlabeled impression, no baseline v1 record), encodes like a frame built from the
records, and the skew report names a feature the lake recomputes differently from what was logged."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
import torch

from batch_jobs import bronze, replay_set, silver, skew_report, training_set
from batch_jobs.gold import gold_path
from infra.spark_session import spark_session
from infra.topics import with_topic_prefix
from schemas.codec import encode as encode_record
from schemas.events import Campaign, Click, Conversion, Impression, PredictionLog
from schemas.features import N_CATEGORIES, AdFeatures, UserFeatures
from tests.test_training_set import gold_row, write
from trainers.data import HISTORY_COLUMN, PROFILE_COLUMN, InputSpec, encode
from trainers.datasets import available_days, read_days

D = datetime.now(UTC).date() - timedelta(days=2)  # a closed day, well within the topics' retention
T0 = int(datetime(D.year, D.month, D.day, 10, tzinfo=UTC).timestamp() * 1000)
CAMPAIGNS = {50: (5, 3), 51: (6, 7)}  # campaign -> (advertiser, category)
ADS = {100: 50, 101: 51, 102: 50}  # ad -> campaign


def user_values(u: int) -> dict:
    return {"user_impressions_1d": 10 + u, "user_clicks_1d": u, "user_ctr_1d": u / (10 + u),
            "user_impressions_7d": 70 + u, "user_clicks_7d": 2 * u, "user_ctr_7d": 2 * u / (70 + u),
            "user_impressions_30d": 300 + u, "user_clicks_30d": 5 * u, "user_ctr_30d": 5 * u / (300 + u),
            "user_conversions_30d": u, "user_cvr_30d": 1 / (5 + u),
            "user_category_profile": [(i + u) / (N_CATEGORIES * (N_CATEGORIES - 1) / 2 + N_CATEGORIES * u)
                                      for i in range(N_CATEGORIES)]}


def ad_values(a: int) -> dict:
    c = ADS[a]
    return {"ad_campaign_id": c, "ad_advertiser_id": CAMPAIGNS[c][0], "ad_category_id": CAMPAIGNS[c][1],
            "ad_impressions_7d": 1000 + a, "ad_clicks_7d": a - 90, "ad_conversions_7d": 3,
            "ad_ctr_7d": (a - 90) / (1000 + a), "ad_cvr_7d": 3 / (a - 90), "ad_campaign_age_days": 4.5,
            "ad_budget_pacing": 0.25 + a / 1000}


def logged(impression_id: str, user: int, ad: int, t: int, *, drop: tuple[str, ...] = (), bump: float = 0.0,
           category: int | None = None) -> PredictionLog:
    """A v2 record with the user's and the ad's store values, some real-time ones and both lists."""
    features = {f"user_features__{k}": float(v) + bump for k, v in user_values(user).items()
                if not isinstance(v, list)}
    features |= {f"ad_features__{k}": float(v) for k, v in ad_values(ad).items()}
    features |= {"user_realtime__user_impressions_1h": 3.0, "user_realtime__user_session_depth": 2.0,
                 "ad_realtime__ad_impressions_24h": 40.0 + user}
    features = {k: v for k, v in features.items() if k not in drop} | {"user_category_affinity": 0.2}
    lists = {HISTORY_COLUMN: [float(ad), 7.0, 9.0], PROFILE_COLUMN: user_values(user)["user_category_profile"]}
    campaign = ADS[ad]
    return PredictionLog(
        request_id=f"req-{impression_id}", impression_id=impression_id, user_id=user, ad_id=ad,
        model_version="full-0001", event_time_ms=t, features=features, pctr=0.05 + bump, pcvr=0.1,
        advertiser_id=CAMPAIGNS[campaign][0], campaign_id=campaign,
        category_id=CAMPAIGNS[campaign][1] if category is None else category, placement="feed", device="ios",
        position=1, bid=2.5, feature_lists=lists, ecpm=0.4, price=1.2, explored=user == 3, arm="treatment")


# impression -> (user, ad, clicked, converted); the logged records and the impression events sent
IMPRESSIONS = {"rp-0": (1, 100, True, True), "rp-1": (1, 101, True, False), "rp-2": (2, 100, False, False),
               "rp-3": (2, 102, False, False), "rp-4": (3, 101, False, False), "rp-5": (3, 102, False, False)}
UNLABELED = "rp-3"  # logged, but its impression never arrives: no matured label
BASELINE = "rp-4"  # only a v1 record of the simulator's baseline
SPARSE = "rp-5"  # serving lacked ad_cvr_7d and did not know the ad's category
REPLAYED = ("rp-0", "rp-1", "rp-2", "rp-5")


def t_of(impression_id: str) -> int:
    return T0 + int(impression_id.split("-")[1]) * 60_000


def first_records() -> dict[str, PredictionLog]:
    out = {}
    for i, (user, ad, _, _) in IMPRESSIONS.items():
        if i != BASELINE:
            out[i] = logged(i, user, ad, t_of(i), drop=("ad_features__ad_cvr_7d",) if i == SPARSE else (),
                            category=-1 if i == SPARSE else None)
    return out


def baseline_payload(impression_id: str, user: int, ad: int) -> bytes:
    """A v1 record as the simulator's delivery writes it: three toy features, no v2 fields."""
    t = t_of(impression_id)
    return orjson.dumps({"request_id": f"req-{impression_id}", "impression_id": impression_id, "user_id": user,
                         "ad_id": ad, "model_version": replay_set.BASELINE_VERSION, "event_time_ms": t,
                         "features": {"position": 1.0, "bid": 2.5, "hour_of_day": 10.0}, "pctr": 0.1,
                         "pcvr": 0.1})


def publish(settings) -> None:
    from kafka import KafkaProducer

    topics = settings.topics
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")

    def send(topic: str, record, t: int) -> None:
        key, value, headers = encode_record(record)
        producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=t + 1_000)

    for c, (adv, cat) in CAMPAIGNS.items():
        send(topics.campaigns, Campaign(campaign_id=c, advertiser_id=adv, category_id=cat, daily_budget=100.0,
                                        start_time_ms=T0 - 5 * 86_400_000, event_time_ms=T0 - 86_400_000),
             T0 - 86_400_000)
    for record in first_records().values():
        send(topics.prediction_log, record, record.event_time_ms)
    user, ad, _, _ = IMPRESSIONS["rp-1"]  # a repeat arriving later, with other values: the first one counts
    send(topics.prediction_log, logged("rp-1", user, ad, t_of("rp-1"), bump=0.5), t_of("rp-1") + 30_000)
    user, ad, _, _ = IMPRESSIONS[BASELINE]
    producer.send(topics.prediction_log, key=BASELINE.encode(), value=baseline_payload(BASELINE, user, ad),
                  headers=[("schema", b"prediction_log/v1")], timestamp_ms=t_of(BASELINE) + 1_000)
    for i, (user, ad, clicked, converted) in IMPRESSIONS.items():
        t, campaign = t_of(i), ADS[ad]
        if i != UNLABELED:
            send(topics.impressions, Impression(
                impression_id=i, request_id=f"req-{i}", user_id=user, ad_id=ad,
                advertiser_id=CAMPAIGNS[campaign][0], campaign_id=campaign, placement="feed", position=1,
                device="ios", bid=2.5, event_time_ms=t, model_version="full-0001", served_pctr=0.05,
                served_pcvr=0.1, feature_ref=i), t)
        if clicked:
            send(topics.clicks, Click(click_id=f"c-{i}", impression_id=i, user_id=user, ad_id=ad,
                                      event_time_ms=t + 10_000), t + 10_000)
        if converted:
            send(topics.conversions, Conversion(conversion_id=f"v-{i}", click_id=f"c-{i}", impression_id=i,
                                                user_id=user, ad_id=ad, event_time_ms=t + 60_000, value=12.5),
                 t + 60_000)
    producer.flush()
    producer.close()


@pytest.fixture(scope="module")
def lake(kafka_settings, tmp_path_factory):
    """Records on fresh topics, landed by bronze and joined by silver for day D; gold rows of the same users
    and ads equal to what was logged, except user 1's ``user_ctr_7d``."""
    settings = with_topic_prefix(kafka_settings, f"t{uuid.uuid4().hex[:8]}").model_copy(
        update={"var_dir": tmp_path_factory.mktemp("replay")})
    spark = spark_session("replay-set-test", settings)
    publish(settings)
    bronze.run(None, settings, quality=False)
    silver.run(D, settings, quality=False)
    ds = D - timedelta(days=1)  # stamped at the start of D: known to every impression of D
    users = [gold_row(UserFeatures, ds, {"user_id": u}, **(user_values(u) | (
        {"user_ctr_7d": 0.9} if u == 1 else {}))) for u in (1, 2, 3)]
    write(spark, users, UserFeatures, gold_path(settings, UserFeatures))
    write(spark, [gold_row(AdFeatures, ds, {"ad_id": a}, **ad_values(a)) for a in ADS], AdFeatures,
          gold_path(settings, AdFeatures))
    yield settings, spark


def expected_row(record: PredictionLog) -> dict:
    """The replay row of a logged record: its context, features and scores, the impression's labels."""
    _, _, clicked, converted = IMPRESSIONS[record.impression_id]
    t = t_of(record.impression_id)
    row = {k: getattr(record, k) for k in replay_set.SERVED_CONTEXT}
    row |= {"impression_id": record.impression_id, "impression_time_ms": t, "clicked": clicked,
            "converted": converted, "click_time_ms": t + 10_000 if clicked else None,
            "conversion_time_ms": t + 60_000 if converted else None, "conversion_value": 12.5 if converted else 0.0,
            "negative_feedback": False, "sample_rate": 1.0, "ds": D.isoformat()}
    for col, dtype in replay_set.training_feature_types().items():
        is_list = dtype.typeName() == "array"
        value = (record.feature_lists if is_list else record.features).get(col)
        integer = (dtype.elementType if is_list else dtype).typeName() == "long"
        if value is not None and integer:
            value = [int(v) for v in value] if is_list else int(value)
        row[col] = value
    row |= {col: getattr(record, field) for col, field in replay_set.EXTRAS.items()}
    return row


def plain(value):
    """A comparable Python value: None for null/NaN, lists for arrays, Python scalars."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def test_replay_rows_equal_the_logged_rows_joined_to_labels(lake):
    from pyspark.sql import functions as F

    settings, spark = lake
    out = replay_set.run(D, D, settings, negative_rate=1.0)
    assert out["days"] == [D.isoformat()] and out["rows"] == len(REPLAYED) and out["positives"] == 2
    assert out["unknown_features"] == ["user_category_affinity"]  # derived by encode, not a training column
    assert available_days(spark, settings, source="replay") == [D.isoformat()]
    frame = read_days(spark, settings, [D.isoformat()], source="replay").sort_values("impression_id")
    frame = frame.reset_index(drop=True)

    pit = training_set.build(spark, settings, D, D, negative_rate=0.5, seed=1)
    assert list(frame.columns) == [*pit.columns[:-1], *replay_set.EXTRAS, "ds"]
    table = spark.read.format("delta").load(replay_set.replay_path(settings))
    types = {f.name: f.dataType for f in table.schema.fields}
    for f in pit.schema.fields:  # the same types (arrays: the same element type)
        mine = types[f.name]
        assert mine == f.dataType or (mine.typeName() == "array" and mine.elementType == f.dataType.elementType)

    records = first_records()
    want = pd.DataFrame([expected_row(records[i]) for i in REPLAYED])
    assert list(frame["impression_id"]) == list(REPLAYED)
    for i, got in zip(REPLAYED, frame.to_dict("records"), strict=True):
        exp = expected_row(records[i])
        assert set(got) == set(exp)
        bad = {c: (plain(got[c]), exp[c]) for c in exp if plain(got[c]) != exp[c]}
        assert not bad, (i, bad)

    spec = InputSpec.from_schemas()
    mine, theirs = encode(frame, spec), encode(want[frame.columns], spec)
    for name in ("sparse", "history", "position", "label_ctr", "label_ctcvr", "weight", "clicked"):
        assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
    torch.testing.assert_close(mine.dense, theirs.dense, rtol=0, atol=0, equal_nan=True)
    assert not torch.isnan(mine.dense).all()

    # Downsampling keeps the impressions the training set keeps (same hash, same rate and seed).
    kept = {r["impression_id"] for r in replay_set.build(spark, settings, D, D, 0.5, seed=1)
            .select("impression_id").collect()}
    same = {r["impression_id"] for r in pit.where(F.col("impression_id").isin(list(REPLAYED)))
            .select("impression_id").collect()}
    assert kept == same and {"rp-0", "rp-1"} <= kept < set(REPLAYED)

    again = replay_set.run(D, D, settings, negative_rate=1.0, quality=False)  # replaces, never appends
    assert again["rows"] == len(REPLAYED)
    assert spark.read.format("delta").load(replay_set.replay_path(settings)).count() == len(REPLAYED)


def test_skew_report_names_the_features_the_lake_recomputes_differently(lake):
    settings, _ = lake
    summary = skew_report.run(D, D, settings)
    out = skew_report.report_dir(settings, D, D)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "user_features__user_ctr_7d" in (out / "report.html").read_text()
    assert summary["rows_compared"] == len(REPLAYED) and summary["replay_rows"] == len(REPLAYED)
    assert summary["recomputed_rows"] == len(IMPRESSIONS) - 1  # every labeled impression
    stats = {s["feature"]: s for s in summary["features"]}

    ctr = stats["user_features__user_ctr_7d"]  # user 1 (rp-0, rp-1): 0.9 in the lake, not what was logged
    assert ctr["equal_share"] == 0.5 and ctr["one_null_share"] == 0.0
    assert ctr["max_abs_diff"] == pytest.approx(0.9 - 2 / 71)
    assert summary["top_differing_batch"][0] == "user_features__user_ctr_7d"
    assert "user_features__user_ctr_7d" in summary["top_differing"]
    assert {e["impression_id"] for e in summary["examples"]["user_features__user_ctr_7d"]} == {"rp-0", "rp-1"}
    for same in ("user_features__user_ctr_30d", "user_features__user_impressions_7d", "ad_features__ad_ctr_7d",
                 PROFILE_COLUMN, "user_category_features__uc_ctr_30d"):
        assert stats[same]["equal_share"] == 1.0, same
    assert stats["ad_features__ad_cvr_7d"]["logged_only_null_share"] == 0.25  # serving lacked it for rp-5
    assert stats["category_id"]["equal_share"] == 0.75  # rp-5 was served as category -1
    # Real-time features: logged, but the lake has no real-time log here; marked as such.
    rt = stats["user_realtime__user_impressions_1h"]
    assert rt["realtime"] and rt["recomputed_only_null_share"] == 1.0
    assert stats[HISTORY_COLUMN]["recomputed_only_null_share"] == 1.0
    assert summary["by_view"]["user_realtime"]["realtime"] and summary["by_view"]["user_realtime"]["differing"] > 0


def test_unknown_source_is_refused():
    from infra.settings import get_settings
    from trainers.datasets import source_table

    with pytest.raises(ValueError, match="unknown training-data source"):
        source_table(get_settings(), "gold")
