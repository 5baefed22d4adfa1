"""``gold.compute`` on a planted bronze (Delta tables written here, read by the real job on Spark): counts come
from what had happened and arrived before the day's end, and CVRs count only matured clicks (issue 21, item 4):
a click whose conversion window is still open must not read as a non-conversion."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from batch_jobs import bronze, gold
from batch_jobs.days import day_bounds
from infra.settings import get_settings
from infra.spark_session import spark_session
from schemas.events import Campaign, Click, Conversion, Impression
from schemas.spark import spark_schema

DS = date(2026, 11, 20)
END = day_bounds(DS)[1]
H, M = 3_600_000, 60_000


def settings_for(tmp_path):
    base = get_settings()
    windows = base.windows.model_copy(update={"conversion_window_s": 3600.0, "conversion_lateness_s": 3600.0})
    return base.model_copy(update={"var_dir": tmp_path, "windows": windows})


def write_bronze(spark, settings, model, rows: list[dict]) -> None:
    """A bronze table of valid records (arrival ``arrival_ms``, 5 s after the event unless given)."""
    from pyspark.sql import functions as F

    frame = pd.DataFrame(rows)
    if "arrival_ms" not in frame:
        frame["arrival_ms"] = frame["event_time_ms"] + 5_000
    frame["arrival_ms"] = frame["arrival_ms"].fillna(frame["event_time_ms"] + 5_000).astype("int64")
    schema = spark_schema(model).add("arrival_ms", "long")
    out = (spark.createDataFrame(frame[[f.name for f in schema.fields]], schema)
           .withColumn("kafka_partition", F.lit(0))
           .withColumn("kafka_offset", F.monotonically_increasing_id())
           .withColumn("reject_reason", F.lit(None).cast("string"))
           .withColumn("payload", F.lit(None).cast("string"))
           .withColumn("ds", F.to_date(F.timestamp_millis("arrival_ms")).cast("string")))
    out.write.format("delta").mode("overwrite").partitionBy("ds").save(
        bronze.table_path(settings, bronze.BY_MODEL[model]))


def impression(i: str, t: int, ad: int, user: int = 1) -> dict:
    campaign = ad // 10
    return {"impression_id": i, "request_id": f"r{i}", "user_id": user, "ad_id": ad, "advertiser_id": campaign,
            "campaign_id": campaign, "placement": "feed", "position": 0, "device": "mobile", "bid": 1.0,
            "event_time_ms": t, "model_version": "m", "served_pctr": 0.1, "served_pcvr": 0.1, "feature_ref": i}


def test_gold_counts_what_was_known_and_cvrs_only_matured_clicks(tmp_path):
    settings = settings_for(tmp_path)  # conversion window 1 h + lateness 1 h: a click matures 2 h after it
    spark = spark_session("test", settings)
    imps, clicks, convs = [], [], []

    def shown(i: str, t: int, ad: int, click_after: int | None = None, conv_after: int | None = None,
              click_arrival: int | None = None) -> None:
        imps.append(impression(i, t, ad))
        if click_after is not None:
            clicks.append({"click_id": f"c{i}", "impression_id": i, "user_id": 1, "ad_id": ad,
                           "event_time_ms": t + click_after, "arrival_ms": click_arrival})
            if conv_after is not None:
                convs.append({"conversion_id": f"v{i}", "click_id": f"c{i}", "impression_id": i, "user_id": 1,
                              "ad_id": ad, "event_time_ms": t + click_after + conv_after, "value": 10.0})

    # Ad 10 (campaign 1, advertiser 1).
    shown("a1", END - 10 * H, 10, M, 30 * M)  # matured click, converted inside the window
    shown("a2", END - 10 * H, 10, M)  # matured click, no conversion
    shown("a3", END - 10 * H, 10)
    shown("a4", END - 10 * H, 10)
    shown("a5", END - 20 * H, 10, M, 3 * H)  # matured click, converted after the 1 h window: not a conversion
    shown("a6", END - 1 * H, 10, M)  # open click (matures at END + 1 h): counts as a click, not for the CVR
    shown("a7", END - 1 * H, 10, M)
    shown("a8", END - 5 * H, 10, H, click_arrival=END + H)  # arrived after the day: unknown to the day
    # Ad 20 (campaign 2, advertiser 2): two matured clicks, both converted.
    shown("b1", END - 12 * H, 20, M, 10 * M)
    shown("b2", END - 12 * H, 20, M, 10 * M)
    shown("b3", END + H, 20, M)  # after the day
    write_bronze(spark, settings, Impression, imps)
    write_bronze(spark, settings, Click, clicks)
    write_bronze(spark, settings, Conversion, convs)
    write_bronze(spark, settings, Campaign, [
        {"campaign_id": c, "advertiser_id": c, "category_id": 3, "daily_budget": 100.0,
         "start_time_ms": END - 48 * H, "event_time_ms": END - 72 * H} for c in (1, 2)])

    frames = gold.compute(spark, settings, DS)
    ads = frames[gold.AdFeatures].toPandas().set_index("ad_id")
    advertisers = frames[gold.AdvertiserFeatures].toPandas().set_index("advertiser_id")
    users = frames[gold.UserFeatures].toPandas().set_index("user_id")

    # Counts: what happened and arrived before the day's end (a8's click and b3 are not known).
    assert ads.loc[10, ["ad_impressions_7d", "ad_clicks_7d", "ad_conversions_7d"]].tolist() == [8, 5, 2]
    assert ads.loc[20, ["ad_impressions_7d", "ad_clicks_7d", "ad_conversions_7d"]].tolist() == [2, 2, 2]
    assert users.loc[1, "user_conversions_30d"] == 4 and users.loc[1, "user_clicks_30d"] == 7

    # CVRs: matured clicks a1, a2, a5 (1 conversion inside the window) and b1, b2 (2): market 3 / 5.
    def smooth(hits: float, n: float, prior: float, k: float = gold.PRIOR_CLICKS) -> float:
        return (hits + prior * k) / (n + k)

    market = 3 / 5
    adv1 = smooth(1, 3, market)
    camp1 = smooth(1, 3, adv1)
    assert advertisers.loc[1, "advertiser_cvr_30d"] == pytest.approx(adv1)
    assert advertisers.loc[2, "advertiser_cvr_30d"] == pytest.approx(smooth(2, 2, market))
    assert ads.loc[10, "ad_cvr_7d"] == pytest.approx(smooth(1, 3, camp1))
    assert users.loc[1, "user_cvr_30d"] == pytest.approx(smooth(3, 5, market, gold.PRIOR_CLICKS / 2))
    # Counting every known click instead (the old rule) would have read ad 10's open clicks as non-conversions.
    naive_market = 4 / 7
    assert ads.loc[10, "ad_cvr_7d"] > smooth(2, 5, smooth(2, 5, smooth(2, 5, naive_market)))
    # CTRs keep every known click: ad 10's 5 of 8, smoothed toward its campaign's and advertiser's.
    market_ctr = 7 / 10
    adv1_ctr = smooth(5, 8, market_ctr, gold.PRIOR_IMPRESSIONS)
    camp1_ctr = smooth(5, 8, adv1_ctr, gold.PRIOR_IMPRESSIONS)
    assert ads.loc[10, "ad_ctr_7d"] == pytest.approx(smooth(5, 8, camp1_ctr, gold.PRIOR_IMPRESSIONS))
    assert ads.loc[10, "ad_category_id"] == 3 and ads.loc[10, "ad_campaign_age_days"] == pytest.approx(2.0)


def test_a_gold_run_releases_the_impressions_it_cached(tmp_path, monkeypatch):
    """A driver that runs gold day after day (a backfill, the features evaluation) keeps no day's impressions
    cached: they filled its heap at full scale. The views read them cached while the day is computed."""
    from pyspark import StorageLevel

    settings = settings_for(tmp_path)
    spark = spark_session("test", settings)
    write_bronze(spark, settings, Impression, [impression(f"i{k}", END - (k + 1) * H, 10 + 10 * (k % 2), user=k % 3)
                                               for k in range(6)])
    write_bronze(spark, settings, Click, [{"click_id": "c0", "impression_id": "i0", "user_id": 0, "ad_id": 10,
                                           "event_time_ms": END - H + M}])
    write_bronze(spark, settings, Conversion, [{"conversion_id": "v0", "click_id": "c0", "impression_id": "i0",
                                                "user_id": 0, "ad_id": 10, "event_time_ms": END - H + 2 * M,
                                                "value": 1.0}])
    write_bronze(spark, settings, Campaign, [
        {"campaign_id": c, "advertiser_id": c, "category_id": 3, "daily_budget": 100.0,
         "start_time_ms": END - 48 * H, "event_time_ms": END - 72 * H} for c in (1, 2)])
    seen = {}
    known_impressions, compute = gold.known_impressions, gold.compute

    def recorded_known(*args, **kwargs):
        seen["joined"] = known_impressions(*args, **kwargs)
        return seen["joined"]

    def recorded_compute(*args, **kwargs):
        seen["cached while computed"] = seen["joined"].storageLevel.useMemory
        return compute(*args, **kwargs)

    monkeypatch.setattr(gold, "known_impressions", recorded_known)
    monkeypatch.setattr(gold, "compute", recorded_compute)
    written = gold.run(DS, settings, quality=False)
    assert written["ad_features"] == 2 and written["user_features"] == 3
    assert seen["cached while computed"]
    assert seen["joined"].storageLevel == StorageLevel.NONE
