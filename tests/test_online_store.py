"""The online layout and read path against Feast itself on the real Redis: what our writer stores,
``get_online_features`` returns; what the scorer's read path returns, Feast returns for the same keys."""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value

from feature_repo.online import KEY_TTL_S, OnlineReader, OnlineWriter, entity_key
from feature_repo.store import feature_store
from schemas.features import ALL_TABLES, N_CATEGORIES, RECENT_ADS, FeatureRow


def test_entity_key_is_feasts():
    keys = {"user_id": 123456789012, "category_id": 7}
    proto = EntityKey(join_keys=list(keys), entity_values=[Value(int64_val=v) for v in keys.values()])
    assert entity_key(keys, "p") == serialize_entity_key(proto, entity_key_serialization_version=3) + b"p"


def random_row(table: type[FeatureRow], keys: dict, rng: random.Random, ts: datetime) -> dict:
    row: dict = {"event_timestamp": ts, **keys}
    for name in table.feature_names():
        annotation = table.model_fields[name].annotation
        if annotation is int:
            row[name] = rng.randrange(0, 1000) if not name.endswith("category_id") else rng.randrange(N_CATEGORIES)
        elif annotation is float:
            row[name] = rng.random()
        elif annotation == list[float]:
            row[name] = [rng.random() for _ in range(N_CATEGORIES)]
        else:
            row[name] = [rng.randrange(0, 10**12) for _ in range(rng.randrange(0, RECENT_ADS))]
    return row


def test_read_path_equals_get_online_features(redis_settings, tmp_path):
    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    store = feature_store(settings, "redis")
    writer, rng = OnlineWriter(settings), random.Random(3)
    ts = datetime(2026, 11, 20, 12, tzinfo=UTC)
    users, ads = [1, 2], list(range(100, 400))  # ads 350.. have no row at all: None everywhere
    rows: dict = {t: [] for t in ALL_TABLES}
    for table in ALL_TABLES:
        if table.ENTITIES == ("user_id",):
            rows[table] = [random_row(table, {"user_id": u}, rng, ts) for u in users]
        elif table.ENTITIES == ("user_id", "category_id"):
            rows[table] = [random_row(table, {"user_id": u, "category_id": c}, rng, ts)
                           for u in users for c in range(0, N_CATEGORIES, 2)]  # half the crosses are missing
        elif table.ENTITIES == ("ad_id",):
            rows[table] = [random_row(table, {"ad_id": a}, rng, ts) for a in ads[:250]]
        else:
            rows[table] = [random_row(table, {"advertiser_id": v}, rng, ts) for v in range(0, 1000, 3)]
    for row in rows[ALL_TABLES[1]]:  # ad_features: advertisers in range, some without advertiser rows
        row["ad_advertiser_id"] = rng.randrange(0, 1000)
    for table, batch in rows.items():
        writer.write(table, batch)

    reader = OnlineReader(settings, refresh_s=0.2).start()
    try:
        service = store.get_feature_service("ranker")
        for user in users:
            candidates = rng.sample(ads, 200)
            got = reader.features(user, candidates).to_feast_dict()
            entity_rows = [{"user_id": user, "ad_id": a, "advertiser_id": v, "category_id": c}
                           for a, v, c in zip(got["ad_id"], got["advertiser_id"], got["category_id"], strict=True)]
            want = store.get_online_features(features=service, entity_rows=entity_rows,
                                             full_feature_names=True).to_dict()
            assert set(got) == set(want)
            for name in want:
                assert got[name] == want[name], name
            # Without the ad cache (storage reads per request) the same request reads the same values.
            uncached = OnlineReader(settings, ad_cache=False)
            assert uncached.features(user, candidates).to_feast_dict() == got
        # A change in the store reaches the cached ads within the refresh period (the stated staleness).
        changed = {**rows[ALL_TABLES[1]][0], "ad_ctr_7d": 0.123456, "event_timestamp": ts + timedelta(hours=1)}
        other = next(a for a in candidates if a != changed["ad_id"])

        def two_refreshes() -> None:  # so that one reload began after what came before
            seen, deadline = reader.refreshes, time.monotonic() + 30
            while reader.refreshes < seen + 2 and time.monotonic() < deadline:
                time.sleep(0.05)

        reader.features(users[0], [changed["ad_id"], other])
        two_refreshes()  # both ads known to the refresh, which reloads an ad only when its row is written again
        before = reader.features(users[0], [changed["ad_id"]]).read_ms["ad"][0]
        written_ms = int(time.time() * 1000)
        writer.write(ALL_TABLES[1], [changed])
        two_refreshes()
        again = reader.features(users[0], [changed["ad_id"]])
        assert again.to_feast_dict()["ad_features__ad_ctr_7d"] == [0.123456]
        # Each candidate carries when its cached rows were read: the reload after the write moved it; an ad the
        # cache did not reload keeps its older read (what training joins the ad views on).
        cached = again.read_ms["ad"][0]
        assert before < written_ms <= cached <= int(time.time() * 1000)
        unchanged = reader.features(users[0], [other]).read_ms
        assert unchanged["ad"][0] < written_ms <= unchanged["checked"][0]  # not re-read, but found current
        # A row rewritten with the same time (a late event in a real-time window) reaches the cache too: the
        # refresh compares the write count, not only the time.
        writer.write(ALL_TABLES[1], [{**changed, "ad_ctr_7d": 0.5}])
        two_refreshes()
        assert reader.features(users[0], [changed["ad_id"]]).to_feast_dict()["ad_features__ad_ctr_7d"] == [0.5]
        # The reader without the cache sees a write at once (no refresh: staleness 0).
        assert uncached.staleness_s == 0.0
        writer.write(ALL_TABLES[1], [{**changed, "ad_ctr_7d": 0.25, "event_timestamp": ts + timedelta(hours=2)}])
        assert uncached.features(users[0], [changed["ad_id"]]).to_feast_dict()["ad_features__ad_ctr_7d"] == [0.25]
        with pytest.raises(ValueError):
            uncached.start()
    finally:
        reader.close()


def test_bulk_loader_writes_what_feast_reads(redis_settings, tmp_path):
    import pandas as pd

    from feature_repo.bulk import bulk_write
    from schemas.features import AdFeatures, UserRealtime

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    store = feature_store(settings, "redis")
    rng = random.Random(9)
    ts = datetime(2026, 11, 20, 12, tzinfo=UTC)
    for table, key in ((AdFeatures, "ad_id"), (UserRealtime, "user_id")):
        rows = [random_row(table, {key: i * 7919}, rng, ts) for i in range(300)]
        rows[0] = {**rows[0], **{n: -5 for n in table.feature_names() if table.model_fields[n].annotation is int}}
        rows[1] = {**rows[1], **{n: 3 * 10**12 for n in table.feature_names()
                                 if table.model_fields[n].annotation is int}}
        assert bulk_write(settings, table, pd.DataFrame(rows), processes=1) == len(rows)
        got = store.get_online_features(features=[f"{table.VIEW}:{n}" for n in table.feature_names()],
                                        entity_rows=[{key: r[key]} for r in rows]).to_dict()
        for name in table.feature_names():
            assert got[name] == [r[name] for r in rows], name
        # Every key expires, as the other writers' do (issue 22: the bulk loader set no TTL).
        client = settings.redis.client()
        ttls = [client.ttl(entity_key({key: r[key]}, settings.feast_project)) for r in rows]
        assert all(0 < t <= KEY_TTL_S for t in ttls), sorted(set(ttls))[:5]


def test_an_older_row_never_overwrites_a_newer_one(redis_settings, tmp_path):
    """A fenced zombie's last batch, or a replay, writes rows older than the stored ones: they are skipped, and Feast
    still reads the newer values; the same row again (an idempotent replay) or a newer one is written."""
    from schemas.features import AdRealtime

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    writer, rng = OnlineWriter(settings), random.Random(5)
    t = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)  # inside the real-time view's TTL
    newer = random_row(AdRealtime, {"ad_id": 7}, rng, t)
    older = random_row(AdRealtime, {"ad_id": 7}, rng, t - timedelta(minutes=5))
    assert writer.write(AdRealtime, [newer]) == 1
    assert writer.write(AdRealtime, [older]) == 0 and writer.skipped_older == 1
    assert writer.write(AdRealtime, [newer]) == 1  # the same time: written again, same values
    store = feature_store(settings, "redis")
    names = [f"{AdRealtime.VIEW}:{n}" for n in AdRealtime.feature_names()]

    def read() -> dict:
        return store.get_online_features(features=names, entity_rows=[{"ad_id": 7}]).to_dict()

    got = read()
    assert all(got[n][0] == newer[n] for n in AdRealtime.feature_names()), got
    latest = random_row(AdRealtime, {"ad_id": 7}, rng, t + timedelta(minutes=1))
    assert writer.write(AdRealtime, [latest]) == 1
    assert all(read()[n][0] == latest[n] for n in AdRealtime.feature_names())


def test_redis_clients_have_socket_timeouts(redis_settings):
    """A hung Redis must not stop a worker's heartbeats: every client the project makes gives up after the settings'
    timeouts (connection_kwargs is redis-py's public record of them)."""
    client = redis_settings.redis.client()
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == redis_settings.redis.socket_timeout_s == 5.0
        assert kwargs["socket_connect_timeout"] == redis_settings.redis.socket_connect_timeout_s
        assert OnlineWriter(redis_settings).client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
    finally:
        client.close()


def test_serving_and_training_agree_on_a_stale_row(redis_settings, tmp_path):
    """Issue 19, item 8: the same TTL rule on both sides. A gold row (TTL 2 days) and a real-time row (1 day) stamped
    at T, read at T + 1 h, T + 30 h and T + 3 days: the read path serves a view's value exactly when training's
    as-of join (Spark) joins it. Every key written expires."""
    from pyspark.sql import functions as F

    from batch_jobs.training_set import EVENT_TIME, as_of_join, feature_columns, view_ttl
    from feature_repo.online import KEY_TTL_S
    from infra.spark_session import spark_session
    from schemas.features import UserFeatures, UserRealtime

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    writer, rng = OnlineWriter(settings), random.Random(5)
    t0 = datetime(2026, 11, 20, 12, tzinfo=UTC)
    rows = {table: random_row(table, {"user_id": 7}, rng, t0) for table in (UserFeatures, UserRealtime)}
    for table, row in rows.items():
        assert writer.write(table, [row]) == 1
    assert 0 < writer.client.ttl(entity_key({"user_id": 7}, settings.feast_project)) <= KEY_TTL_S

    reader = OnlineReader(settings)
    spark = spark_session("ttl-test", settings)
    reads = {"1h": timedelta(hours=1), "30h": timedelta(hours=30), "3d": timedelta(days=3)}
    served, joined = {}, {}
    for label, after in reads.items():
        as_of = t0 + after
        got = reader.features(7, [1], as_of_ms=int(as_of.timestamp() * 1000))
        frame = spark.createDataFrame([("i", 7, as_of.replace(tzinfo=None))], ["impression_id", "user_id", EVENT_TIME])
        for table, row in rows.items():
            name = table.feature_names()[0]
            served[(label, table.VIEW)] = got.user[f"{table.VIEW}__{name}"] is not None
            gold = spark.createDataFrame([(7, t0.replace(tzinfo=None), "2026-11-20", row[name])],
                                         ["user_id", "event_timestamp", "ds", name])
            gold = gold.select("user_id", "event_timestamp", "ds", F.col(name))
            out = as_of_join(frame.select("impression_id", "user_id", EVENT_TIME), gold, _only(table, name),
                             view_ttl(table)).collect()[0]
            joined[(label, table.VIEW)] = out[feature_columns(_only(table, name))[0]] is not None
    assert served == joined, (served, joined)
    assert served == {("1h", "user_features"): True, ("1h", "user_realtime"): True,
                      ("30h", "user_features"): True, ("30h", "user_realtime"): False,
                      ("3d", "user_features"): False, ("3d", "user_realtime"): False}
    # Without a request time the read path answers as before (what the store holds).
    assert reader.features(7, [1]).user["user_realtime__" + UserRealtime.feature_names()[0]] is not None


def _only(table: type[FeatureRow], name: str) -> type[FeatureRow]:
    """``table`` seen through one feature (the as-of join selects every feature of the view it is given)."""

    class One(table):
        @classmethod
        def feature_names(cls) -> list[str]:
            return [name]

    One.VIEW, One.ENTITIES, One.REALTIME = table.VIEW, table.ENTITIES, table.REALTIME
    return One


def test_the_request_category_finds_the_user_category_row_of_an_ad_without_a_gold_row(redis_settings, tmp_path):
    """Issue 19, item 2 (found by the demo's skew report: user x category features were null in 37 % of logged rows
    where the lake had them): an ad with no gold row yet has no stored category, so the read path skipped its
    user x category row; the training set joins it by the catalog's category. The request's category now chooses
    the row, as training does; a stored category still serves when the request gives none."""
    from schemas.features import UserCategoryFeatures

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    writer, rng = OnlineWriter(settings), random.Random(9)
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    row = random_row(UserCategoryFeatures, {"user_id": 7, "category_id": 3}, rng, t0)
    assert writer.write(UserCategoryFeatures, [row]) == 1
    reader = OnlineReader(settings)
    name = "user_category_features__" + UserCategoryFeatures.feature_names()[0]
    at = int((t0 + timedelta(hours=1)).timestamp() * 1000)
    assert reader.features(7, [123], as_of_ms=at).cross[name] == [None]  # no gold row for ad 123: unknown category
    got = reader.features(7, [123, 124], as_of_ms=at, category_ids=[3, -1]).cross[name]
    assert got[0] == row[UserCategoryFeatures.feature_names()[0]] and got[1] is None


def test_the_request_advertiser_finds_the_advertiser_row_of_an_ad_without_a_gold_row(redis_settings, tmp_path):
    """Issue 19, item 2, the rest of the demo's batch skew (advertiser features null at serving in 0.8-2.75 % of
    rows where the lake had them): an ad with no stored row names no advertiser; the request's advertiser id now
    chooses the advertiser row (gold and real-time), as the training set joins it. TTL still applies."""
    from schemas.features import AdvertiserFeatures

    settings = redis_settings.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    writer, rng = OnlineWriter(settings), random.Random(11)
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    row = random_row(AdvertiserFeatures, {"advertiser_id": 5}, rng, t0)
    assert writer.write(AdvertiserFeatures, [row]) == 1
    reader = OnlineReader(settings)
    first = AdvertiserFeatures.feature_names()[0]
    name = f"advertiser_features__{first}"
    at = int((t0 + timedelta(hours=1)).timestamp() * 1000)
    assert reader.features(7, [123], as_of_ms=at).to_feast_dict()[name] == [None]  # no ad row: no advertiser
    got = reader.features(7, [123, 124], as_of_ms=at, advertiser_ids=[5, -1]).to_feast_dict()[name]
    assert got[0] == row[first] and got[1] is None
    stale = int((t0 + timedelta(days=3)).timestamp() * 1000)  # past the gold TTL (2 days): absent, as in training
    assert reader.features(7, [123], as_of_ms=stale, advertiser_ids=[5]).to_feast_dict()[name] == [None]
