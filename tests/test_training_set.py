"""The training-set builder against real Spark + Delta (and Feast's Spark offline store as the oracle):
point-in-time joins never leak a later value, the TTL holds, quarantined days are skipped, negative
downsampling is deterministic and re-runs replace their partitions."""

from __future__ import annotations

import importlib
import math
import random
from datetime import UTC, date, datetime, timedelta

import pytest

from batch_jobs import quality, training_set
from batch_jobs.gold import gold_path
from batch_jobs.realtime_log import realtime_path
from batch_jobs.silver import silver_path
from infra.settings import get_settings
from infra.spark_session import spark_session
from schemas.events import LabeledImpression
from schemas.features import GOLD_TABLES, N_CATEGORIES, REALTIME_TABLES, FeatureRow, UserFeatures, UserRealtime
from schemas.spark import spark_schema

DAY = timedelta(days=1)
D = date(2026, 11, 10)  # the planted user_features rows: end of D (0.1) and end of D+1 (0.9)
FIRST, LAST = D, D + 3 * DAY  # the silver days of the point-in-time tests
SAMPLE_DAY = date(2026, 11, 20)  # the downsampling test's day
GOLD_DAYS = [D - 3 * DAY + i * DAY for i in range(6)]  # 11-07 .. 11-12
PLANTED_USERS = (1, 2, 3)  # only the planted user_features rows; users 4.. get random ones
USERS, ADS, ADVERTISERS = range(1, 10), range(100, 130), range(6)


def at(day: date, hours: float = 0.0, ms: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hours, milliseconds=ms)


def epoch_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def value_for(name: str, annotation, rng: random.Random | None):
    """A valid value of a field's type: the type's plain default, or a random one with ``rng``."""
    if annotation is str:
        return "x"
    if annotation is bool:
        return rng.random() < 0.5 if rng else False
    if annotation is int:
        if name.endswith("category_id"):
            return rng.randrange(N_CATEGORIES) if rng else 0
        return rng.randrange(1000) if rng else 0
    if annotation is float:
        return rng.random() if rng else 0.0
    if annotation == list[float]:
        return [rng.random() if rng else 1.0 / N_CATEGORIES for _ in range(N_CATEGORIES)]
    if annotation == list[int]:
        return []
    raise TypeError(f"no test value for {name}: {annotation!r}")


def silver_row(impression_id: str, t: datetime, **values) -> dict:
    """A valid LabeledImpression row (every field from the model) plus ``ds``."""
    row = {n: (f.default if not f.is_required() else value_for(n, f.annotation, None))
           for n, f in LabeledImpression.model_fields.items()}
    row.update(impression_id=impression_id, request_id="r", impression_time_ms=epoch_ms(t), placement="feed",
               device="ios", **values)
    row = LabeledImpression(**row).model_dump()
    return row | {"ds": t.date().isoformat()}


def gold_row(table: type[FeatureRow], ds: date, keys: dict, rng: random.Random | None = None, **values) -> dict:
    """A valid row of ``table`` for day ``ds`` (stamped with the end of the day), random features with ``rng``."""
    row = {n: value_for(n, table.model_fields[n].annotation, rng) for n in table.feature_names()}
    row.update(keys, event_timestamp=at(ds + DAY), **values)
    return table(**row).model_dump() | {"ds": ds.isoformat()}


def write(spark, rows: list[dict], model, path: str, mode: str = "append") -> None:
    from pyspark.sql import types as T

    schema = spark_schema(model).add("ds", T.StringType())
    frame = spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema)
    frame.write.format("delta").partitionBy("ds").mode(mode).save(path)


# impression id -> (user, time, the user_features__user_ctr_7d it must get)
PLANTED = {
    "leak-before-any-row": (1, at(D, 12), None),
    "leak-day-after-d": (1, at(D + DAY, 12), 0.1),  # the 0.9 row exists (end of D+1) but is later
    "leak-last-ms-of-d+1": (1, at(D + 2 * DAY, ms=-1), 0.1),
    "leak-at-the-stamp": (1, at(D + 2 * DAY), 0.9),  # a row stamped exactly at the impression is known then
    "leak-d+2": (1, at(D + 2 * DAY, 1), 0.9),
    "ttl-too-old": (2, at(D + DAY, 12), None),  # user 2's only row is 3.5 days old
    "ttl-exactly": (3, at(D + 3 * DAY), 0.3),  # exactly the 2-day TTL: still valid (Feast's >= too)
    "ttl-one-ms-past": (3, at(D + 3 * DAY, ms=1), None),
}


# Real-time rows of user 1 at T1 (5 impressions in the last hour) and T2 (7); the worker wrote the T2 row
# after the impression at T2 was shown, so that impression must not see it.
T1, T2 = at(D + DAY, 12), at(D + DAY, 13)
RT_PLANTED = {"rt-before-any": (T1 - timedelta(milliseconds=1), None), "rt-at-t2": (T2, 5),
              "rt-after-t2": (T2 + timedelta(milliseconds=1), 7)}


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """Settings on a fresh lake with silver and gold written; the Spark session on it."""
    settings = get_settings().model_copy(update={"var_dir": tmp_path_factory.mktemp("training")})
    spark = spark_session("training-set-test", settings)
    rng = random.Random(11)

    def context(i: str, t: datetime, user: int) -> dict:
        return silver_row(i, t, user_id=user, ad_id=rng.choice(ADS), advertiser_id=rng.choice(ADVERTISERS),
                          category_id=rng.randrange(N_CATEGORIES), clicked=rng.random() < 0.2)

    silver = [context(i, t, user) for i, (user, t, _) in PLANTED.items()]
    silver += [context(i, t, 1) for i, (t, _) in RT_PLANTED.items()]
    start = epoch_ms(at(FIRST))
    for i in range(300):
        t = datetime.fromtimestamp((start + rng.randrange(4 * 86_400_000)) / 1000, UTC)
        silver.append(context(f"imp-{i:04d}", t, rng.choice(USERS)))
    # The downsampling day: 4,000 impressions, 5% clicked.
    silver += [silver_row(f"s-{i:05d}", at(SAMPLE_DAY, ms=i * 1000), user_id=1, clicked=i % 20 == 0)
               for i in range(4000)]
    write(spark, silver, LabeledImpression, silver_path(settings))

    ctr = "user_ctr_7d"
    gold: dict = {t: [] for t in GOLD_TABLES}
    gold[UserFeatures] += [gold_row(UserFeatures, D, {"user_id": 1}, **{ctr: 0.1}),
                           gold_row(UserFeatures, D + DAY, {"user_id": 1}, **{ctr: 0.9}),
                           gold_row(UserFeatures, D - 3 * DAY, {"user_id": 2}, **{ctr: 0.5}),
                           gold_row(UserFeatures, D, {"user_id": 3}, **{ctr: 0.3})]
    for ds in GOLD_DAYS:  # random rows, some entities missing on some days
        for table in GOLD_TABLES:
            if table.ENTITIES == ("user_id",):
                keys = [{"user_id": u} for u in USERS if u not in PLANTED_USERS]
            elif table.ENTITIES == ("ad_id",):
                keys = [{"ad_id": a} for a in ADS]
            elif table.ENTITIES == ("advertiser_id",):
                keys = [{"advertiser_id": a} for a in ADVERTISERS]
            else:
                keys = [{"user_id": u, "category_id": c} for u in USERS for c in range(N_CATEGORIES)]
            gold[table] += [gold_row(table, ds, k, rng) for k in keys if rng.random() < 0.6]
    for table, rows in gold.items():
        write(spark, rows, table, gold_path(settings, table))
    realtime = [UserRealtime(**{n: value_for(n, UserRealtime.model_fields[n].annotation, None)
                                for n in UserRealtime.feature_names()}
                             | {"user_id": 1, "event_timestamp": t, "user_impressions_1h": n}).model_dump()
                | {"ds": t.date().isoformat()} for t, n in ((T1, 5), (T2, 7))]
    write(spark, realtime, UserRealtime, realtime_path(settings, UserRealtime))
    return settings, spark


def by_id(frame) -> dict:
    return {r["impression_id"]: r.asDict() for r in frame.collect()}


def test_point_in_time_join_never_leaks_and_honours_the_ttl(lake):
    settings, spark = lake
    rows = by_id(training_set.build(spark, settings, FIRST, LAST, negative_rate=1.0))
    assert len(rows) == 300 + len(PLANTED) + len(RT_PLANTED)
    for impression_id, (_, _, want) in PLANTED.items():
        assert rows[impression_id]["user_features__user_ctr_7d"] == want, impression_id
    for impression_id, (_, want) in RT_PLANTED.items():  # real-time rows: strictly before the impression
        assert rows[impression_id]["user_realtime__user_impressions_1h"] == want, impression_id
    row = rows["leak-day-after-d"]
    assert row["sample_rate"] == 1.0 and row["ds"] == (D + DAY).isoformat()
    expected = {f"{t.VIEW}__{n}" for t in GOLD_TABLES + REALTIME_TABLES for n in t.feature_names()}
    assert expected <= set(row) and set(row) - expected == {*training_set.TrainingRow.model_fields, "ds"}


def test_quarantined_days_are_skipped(lake):
    settings, spark = lake
    quality.quarantine(settings, "gold/user_features", (D + DAY).isoformat(), ["test"])
    quality.quarantine(settings, training_set.SILVER_TABLE, LAST.isoformat(), ["test"])
    try:
        rows = by_id(training_set.build(spark, settings, FIRST, LAST, negative_rate=1.0))
    finally:
        quality.release(settings, "gold/user_features", (D + DAY).isoformat())
        quality.release(settings, training_set.SILVER_TABLE, LAST.isoformat())
    assert LAST.isoformat() not in {r["ds"] for r in rows.values()}
    assert "ttl-exactly" not in rows
    # Without the 0.9 row of D+1, the impression after it falls back to D's row (25 h old, within the TTL).
    assert rows["leak-d+2"]["user_features__user_ctr_7d"] == 0.1
    assert rows["leak-day-after-d"]["user_features__user_ctr_7d"] == 0.1


def test_downsampling_is_deterministic_and_reruns_replace(lake):
    from pyspark.sql import functions as F

    settings, spark = lake
    out = training_set.run(SAMPLE_DAY, SAMPLE_DAY, settings, negative_rate=0.1, seed=7)
    table = spark.read.format("delta").load(training_set.training_path(settings))
    day = table.where(F.col("ds") == SAMPLE_DAY.isoformat())
    first = by_id(day)
    positives = {i for i, r in first.items() if r["clicked"]}
    negatives = {i for i, r in first.items() if not r["clicked"]}
    assert len(positives) == 200 and out["positives"] == 200 and out["days"] == [SAMPLE_DAY.isoformat()]
    assert all(first[i]["sample_rate"] == 1.0 for i in positives)
    assert all(first[i]["sample_rate"] == 0.1 for i in negatives)
    assert 0.07 * 3800 < len(negatives) < 0.13 * 3800, len(negatives)
    assert out["rows"] == len(first)
    assert quality.quarantined_days(settings, training_set.TABLE) == set()
    # The label-rate check ran (200 / 616 is within its range); only coverage warns (no gold on that day).
    warned = out["warnings"][SAMPLE_DAY.isoformat()]
    assert warned and all("proportion_of_non_null" in w for w in warned), warned

    again = training_set.run(SAMPLE_DAY, SAMPLE_DAY, settings, negative_rate=0.1, seed=7)
    second = by_id(spark.read.format("delta").load(training_set.training_path(settings))
                   .where(F.col("ds") == SAMPLE_DAY.isoformat()))
    assert set(second) == set(first) and again["rows"] == out["rows"]  # same rows, replaced (not appended)
    other = {r["impression_id"] for r in training_set.build(spark, settings, SAMPLE_DAY, SAMPLE_DAY, 0.1, seed=8)
             .where(~F.col("clicked")).collect()}
    assert other != negatives  # the seed picks the negatives


@pytest.fixture
def feast_store(lake, monkeypatch):
    """Feast on the test lake: the repo's source paths come from the settings at import, so re-import them."""
    from feature_repo import features
    from feature_repo.store import ensure_offline_tables, feature_store

    settings, spark = lake
    monkeypatch.setenv("ADS_VAR_DIR", str(settings.var_dir))
    get_settings.cache_clear()
    importlib.reload(features)
    try:
        ensure_offline_tables(spark, settings)  # the real-time views' (empty) sources, for apply
        yield feature_store(settings, "sqlite")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        importlib.reload(features)


def plain(value):
    """A comparable Python value: None for null/NaN, a list of floats for an array, else a float."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "__len__") and not isinstance(value, str):
        return [float(v) for v in value]
    return float(value)


def same(a, b) -> bool:
    a, b = plain(a), plain(b)
    if a is None or b is None:
        return a is b
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            math.isclose(x, y, rel_tol=0.0, abs_tol=1e-12) for x, y in zip(a, b, strict=True))
    return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-12)


def test_features_equal_feasts_historical_features(lake, feast_store):
    """Feast's Spark offline store is the oracle: same entity rows, same feature values.

    Feast keys an entity row by the concatenation of its join keys and timestamp as strings (no separator), so
    keys like (1, 12) and (11, 2) could collide; the test's users are single digits, which rules that out."""
    import pandas as pd

    settings, spark = lake
    mine = training_set.build(spark, settings, FIRST, LAST, negative_rate=1.0).toPandas()
    mine = mine.sort_values("impression_id").reset_index(drop=True)
    entity_df = pd.DataFrame({
        "impression_id": mine["impression_id"], "user_id": mine["user_id"].astype("int64"),
        "ad_id": mine["ad_id"].astype("int64"), "advertiser_id": mine["advertiser_id"].astype("int64"),
        "category_id": mine["category_id"].astype("int64"),
        "event_timestamp": pd.to_datetime(mine["impression_time_ms"], unit="ms", utc=True)})
    refs = [f"{t.VIEW}:{n}" for t in GOLD_TABLES for n in t.feature_names()]
    feast = feast_store.get_historical_features(entity_df=entity_df, features=refs,
                                                full_feature_names=True).to_df()
    feast = feast.sort_values("impression_id").reset_index(drop=True)
    assert list(feast["impression_id"]) == list(mine["impression_id"])
    columns = [r.replace(":", "__") for r in refs]
    mismatches = [(mine.at[i, "impression_id"], c, mine.at[i, c], feast.at[i, c])
                  for c in columns for i in range(len(mine)) if not same(mine.at[i, c], feast.at[i, c])]
    assert not mismatches, mismatches[:10]
    # The data exercise both found and missing values in every view.
    for c in ("user_features__user_ctr_7d", "ad_features__ad_ctr_7d", "advertiser_features__advertiser_ctr_30d",
              "user_category_features__uc_ctr_30d"):
        found = mine[c].notna().sum()
        assert 0 < found < len(mine), (c, found)
