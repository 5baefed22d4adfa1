"""Gold: the batch features of every user, ad, advertiser and user x category, as of the end of a day.

``python -m batch_jobs.gold --ds 2026-11-15`` reads the valid events in bronze that had both happened and
arrived before the end of ``ds`` (nothing later can leak into a feature stamped with that time), and
replaces the ``ds`` partition of ``<lake>/gold/<view>`` for each view in ``schemas.features.GOLD_TABLES``.
Every row's ``event_timestamp`` is the end of ``ds``: the moment the values became true.

Rates are smoothed toward a prior so a new entity is not 0 or 1: an ad's CTR toward its campaign's, the
campaign's toward its advertiser's, the advertiser's toward the whole market's (``PRIOR_IMPRESSIONS``
pseudo-impressions each); CVRs likewise with ``PRIOR_CLICKS`` pseudo-clicks. A user's interest profile is
the share of their clicks per category over 30 days, with one pseudo-click per category.

CVRs count **matured clicks** only: clicks whose conversion window and its lateness had closed by the end of
``ds`` (their conversions are all in), over the 7 (or 30) days in which they matured, with the conversions
inside the window. A click still open would count as a non-conversion and bias every recent ad's CVR down
(most of all a new ad's, whose clicks are all recent); an ad with no matured click gets its campaign's CVR.
The conversion counts (``ad_conversions_7d``, ``user_conversions_30d``) stay what was known by the day's end.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from batch_jobs.bronze import campaigns_as_of, read_bronze
from batch_jobs.days import day_bounds, day_end
from batch_jobs.quality import guard, previous_counts, volume_check
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from label_joiner.rules import Rules
from schemas.events import Click, Conversion, Impression
from schemas.features import (
    GOLD_TABLES,
    N_CATEGORIES,
    AdFeatures,
    AdvertiserFeatures,
    FeatureRow,
    UserCategoryFeatures,
    UserFeatures,
)

DAY_MS = 86_400_000
PRIOR_IMPRESSIONS = 200.0
PRIOR_CLICKS = 20.0


def gold_path(settings: Settings, table: type[FeatureRow]) -> str:
    return str(settings.lake_dir / "gold" / table.VIEW)


def smoothed(hits, trials, prior, strength: float):
    """(hits + strength * prior) / (trials + strength): a Beta-prior posterior mean, never 0 or 1."""
    return (hits + prior * strength) / (trials + strength)


def known_by(spark, settings: Settings, model, end_ms: int, rules: Rules):
    """Valid events of ``model`` that happened and arrived before ``end_ms``, each id once."""
    from pyspark.sql import functions as F

    key = {Impression: "impression_id", Click: "click_id", Conversion: "conversion_id"}[model]
    frame = read_bronze(spark, settings, model)
    return (frame.where((F.col("event_time_ms") < end_ms) & (F.col("arrival_ms") < end_ms))
            .where(rules.plausible(F.col("event_time_ms"), F.col("arrival_ms")))
            .dropDuplicates([key]))


def maturity_ms(settings: Settings) -> int:
    """How long after a click its conversions can still count: the conversion window plus its lateness."""
    return int((settings.windows.conversion_window_s + settings.windows.conversion_lateness_s) * 1000)


def matured_clicks(events, end_ms: int, settings: Settings):
    """The clicked impressions whose conversion window and lateness closed by ``end_ms``: ``matured_d`` days
    since they matured, ``mconv`` 1 when a conversion came inside the window (``events``: one row per impression
    with ``click``, ``click_ms``, ``conv``, ``conv_ms``)."""
    from pyspark.sql import functions as F

    window_ms = int(settings.windows.conversion_window_s * 1000)
    done = F.col("click_ms") + F.lit(maturity_ms(settings))
    in_window = (F.col("conv") == 1) & (F.col("conv_ms") - F.col("click_ms") <= window_ms)
    return (events.where((F.col("click") == 1) & (done <= end_ms))
            .select("*", ((F.lit(end_ms) - done) / DAY_MS).alias("matured_d"),
                    F.when(in_window, 1).otherwise(0).alias("mconv"))
            .where(F.col("matured_d") < 30))


def known_impressions(spark, settings: Settings, ds: date):
    """The impressions known by the end of ``ds`` from its last 30 days (and the conversion maturity before them),
    each with its category, its age in days, and its click and conversion (flag and time) as known by then."""
    from pyspark.sql import functions as F

    _, end_ms = day_bounds(ds)
    rules = Rules.from_settings(settings.windows)
    catalog = campaigns_as_of(spark, settings, end_ms)
    imps = (known_by(spark, settings, Impression, end_ms, rules)
            .where(F.col("event_time_ms") >= end_ms - 30 * DAY_MS - maturity_ms(settings))
            .join(F.broadcast(catalog.select("campaign_id", "category_id")), "campaign_id", "left")
            .select("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "bid",
                    F.coalesce("category_id", F.lit(0)).alias("category_id"),
                    ((F.lit(end_ms) - F.col("event_time_ms")) / DAY_MS).alias("age_d")))
    clicks = (known_by(spark, settings, Click, end_ms, rules)
              .groupBy("impression_id").agg(F.lit(1).alias("click"), F.min("event_time_ms").alias("click_ms")))
    convs = (known_by(spark, settings, Conversion, end_ms, rules)
             .groupBy("impression_id").agg(F.lit(1).alias("conv"), F.min("event_time_ms").alias("conv_ms")))
    return (imps.join(clicks, "impression_id", "left").join(convs, "impression_id", "left")
            .fillna(0, ["click", "conv"]))


def compute(spark, settings: Settings, ds: date, joined=None) -> dict[type[FeatureRow], object]:
    """The four gold frames of ``ds`` (columns exactly the tables' fields), from ``joined`` (default: a fresh
    :func:`known_impressions` of ``ds``; a caller that caches it releases it)."""
    from pyspark.sql import functions as F

    _, end_ms = day_bounds(ds)
    ts = F.lit(day_end(ds)).cast("timestamp").alias("event_timestamp")
    catalog = campaigns_as_of(spark, settings, end_ms)
    joined = known_impressions(spark, settings, ds) if joined is None else joined
    events = joined.where(F.col("age_d") < 30)
    matured = matured_clicks(joined, end_ms, settings)

    def within(days: int, col: str = "*"):
        flag = F.col("age_d") < days
        return F.sum(F.when(flag, F.lit(1) if col == "*" else F.col(col)).otherwise(0)).cast("long")

    market = events.where("age_d < 7").agg(F.sum("click").alias("c"), F.count("*").alias("n")).first()
    g_ctr = (market["c"] or 0) / max(market["n"] or 0, 1)
    g_ctr30 = events.agg(F.avg("click")).first()[0] or 0.0
    week_m = matured.where("matured_d < 7")
    m = week_m.agg(F.count("*").alias("mc"), F.sum("mconv").alias("mv")).first()
    g_cvr = (m["mv"] or 0) / max(m["mc"] or 0, 1)

    def matured_counts(frame, *keys: str):
        """Matured clicks ``mc`` and their conversions ``mv`` per ``keys``."""
        return frame.groupBy(*keys).agg(F.count("*").alias("mc"), F.sum("mconv").alias("mv"))

    def cvr(prior, strength: float = PRIOR_CLICKS):
        return smoothed(F.coalesce("mv", F.lit(0)), F.coalesce("mc", F.lit(0)), prior, strength)

    # Advertisers -> campaigns -> ads, each smoothed toward the level above (last 7 days).
    week = events.where("age_d < 7")
    adv = (week.groupBy("advertiser_id").agg(F.count("*").alias("n"), F.sum("click").alias("c"))
           .join(matured_counts(week_m, "advertiser_id"), "advertiser_id", "left"))
    adv = adv.select("advertiser_id", smoothed(F.col("c"), F.col("n"), F.lit(g_ctr), PRIOR_IMPRESSIONS)
                     .alias("adv_ctr"), cvr(F.lit(g_cvr)).alias("adv_cvr"))
    camp = (week.groupBy("campaign_id", "advertiser_id").agg(F.count("*").alias("n"), F.sum("click").alias("c"))
            .join(matured_counts(week_m, "campaign_id"), "campaign_id", "left")
            .join(adv, "advertiser_id")
            .select("campaign_id", smoothed(F.col("c"), F.col("n"), F.col("adv_ctr"), PRIOR_IMPRESSIONS)
                    .alias("camp_ctr"), cvr(F.col("adv_cvr")).alias("camp_cvr")))
    spend = (events.where(F.col("age_d") < 1).where("click = 1").groupBy("campaign_id")
             .agg(F.sum("bid").alias("spend")))
    ads = (week.groupBy("ad_id").agg(F.first("campaign_id").alias("ad_campaign_id"),
                                     F.first("advertiser_id").alias("ad_advertiser_id"),
                                     F.first("category_id").alias("ad_category_id"),
                                     F.count("*").alias("ad_impressions_7d"),
                                     F.sum("click").cast("long").alias("ad_clicks_7d"),
                                     F.sum("conv").cast("long").alias("ad_conversions_7d"))
           .join(matured_counts(week_m, "ad_id"), "ad_id", "left")
           .join(camp, F.col("ad_campaign_id") == F.col("campaign_id"))
           .join(catalog.select(F.col("campaign_id").alias("cid"), "daily_budget", "start_time_ms"),
                 F.col("ad_campaign_id") == F.col("cid"), "left")
           .join(spend.withColumnRenamed("campaign_id", "sid"), F.col("ad_campaign_id") == F.col("sid"), "left")
           .select(ts, "ad_id", "ad_campaign_id", "ad_advertiser_id", "ad_category_id", "ad_impressions_7d",
                   "ad_clicks_7d", "ad_conversions_7d",
                   smoothed(F.col("ad_clicks_7d"), F.col("ad_impressions_7d"), F.col("camp_ctr"), PRIOR_IMPRESSIONS)
                   .alias("ad_ctr_7d"),
                   cvr(F.col("camp_cvr")).alias("ad_cvr_7d"),
                   F.greatest(F.lit(0.0), (F.lit(end_ms) - F.coalesce("start_time_ms", F.lit(end_ms))) / DAY_MS)
                   .alias("ad_campaign_age_days"),
                   (F.coalesce("spend", F.lit(0.0)) / F.greatest(F.col("daily_budget"), F.lit(1e-9)))
                   .alias("ad_budget_pacing"))
           .fillna(0.0, ["ad_budget_pacing"]))

    advertisers = (events.groupBy("advertiser_id")
                   .agg(F.count("*").alias("advertiser_impressions_30d"), F.sum("click").alias("c"))
                   .join(matured_counts(matured, "advertiser_id"), "advertiser_id", "left")
                   .select(ts, "advertiser_id", "advertiser_impressions_30d",
                           smoothed(F.col("c"), F.col("advertiser_impressions_30d"), F.lit(g_ctr30), PRIOR_IMPRESSIONS)
                           .alias("advertiser_ctr_30d"), cvr(F.lit(g_cvr)).alias("advertiser_cvr_30d")))

    per_user = [within(d).alias(f"user_impressions_{d}d") for d in (1, 7, 30)]
    per_user += [within(d, "click").alias(f"user_clicks_{d}d") for d in (1, 7, 30)]
    profile_counts = [F.sum(F.when(F.col("category_id") == k, F.col("click")).otherwise(0)).alias(f"cat{k}")
                      for k in range(N_CATEGORIES)]
    users = (events.groupBy("user_id").agg(*per_user, within(30, "conv").alias("user_conversions_30d"),
                                           *profile_counts)
             .join(matured_counts(matured, "user_id"), "user_id", "left"))
    clicks30 = F.col("user_clicks_30d")
    users = users.select(
        ts, "user_id",
        *[c for d in (1, 7, 30) for c in (
            F.col(f"user_impressions_{d}d"), F.col(f"user_clicks_{d}d"),
            smoothed(F.col(f"user_clicks_{d}d"), F.col(f"user_impressions_{d}d"), F.lit(g_ctr30), PRIOR_CLICKS)
            .alias(f"user_ctr_{d}d"))],
        "user_conversions_30d",
        cvr(F.lit(g_cvr), PRIOR_CLICKS / 2).alias("user_cvr_30d"),
        F.array(*[((F.col(f"cat{k}") + 1.0) / (clicks30 + N_CATEGORIES)) for k in range(N_CATEGORIES)])
        .alias("user_category_profile"))

    user_cat = (events.groupBy("user_id", "category_id")
                .agg(F.count("*").alias("uc_impressions_30d"), F.sum("click").cast("long").alias("uc_clicks_30d"))
                .join(users.select("user_id", F.col("user_ctr_30d")), "user_id")
                .select(ts, "user_id", "category_id", "uc_impressions_30d", "uc_clicks_30d",
                        smoothed(F.col("uc_clicks_30d"), F.col("uc_impressions_30d"), F.col("user_ctr_30d"),
                                 PRIOR_CLICKS).alias("uc_ctr_30d")))
    frames = {UserFeatures: users, AdFeatures: ads, AdvertiserFeatures: advertisers, UserCategoryFeatures: user_cat}
    return {table: frame.select(*table.model_fields) for table, frame in frames.items()}


def run(ds: date, settings: Settings | None = None, quality: bool = True) -> dict[str, int]:
    """Replace the ``ds`` partition of every gold table; return rows written per view. With ``quality``
    (write-audit-publish), every view's frame is checked first (its schema, and its volume against the
    previous days') and nothing is written unless all four pass: Feast never loads a failed or half day."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    settings = settings or get_settings()
    spark = spark_session("gold", settings)
    # Every view reads the day's known impressions: cached once, and released with the views when the day is
    # written (a driver that runs day after day, as a backfill or the evaluation does, kept every day's copy).
    joined = known_impressions(spark, settings, ds).cache()
    frames = {}
    try:
        frames = {table: frame.withColumn("ds", F.lit(ds.isoformat())).cache()
                  for table, frame in compute(spark, settings, ds, joined).items()}
        if quality:
            for table, frame in frames.items():
                path = gold_path(settings, table)
                previous = (previous_counts(spark.read.format("delta").load(path), ds.isoformat())
                            if DeltaTable.isDeltaTable(spark, path) else [])
                checks = [c for c in [volume_check(previous)] if c is not None]
                result = guard(frame, table, f"gold/{table.VIEW}", ds.isoformat(), settings, checks)
                print(f"gold: quality of {table.VIEW} {ds}: passed, report {result.report_path}", flush=True)
        written = {}
        for table, frame in frames.items():
            (frame.write.format("delta").mode("overwrite").partitionBy("ds")
             .option("replaceWhere", f"ds = '{ds.isoformat()}'").save(gold_path(settings, table)))
            written[table.VIEW] = frame.count()
    finally:
        for frame in frames.values():
            frame.unpersist()
        joined.unpersist()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.gold", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", type=date.fromisoformat, required=True, help="UTC day, YYYY-MM-DD")
    a = p.parse_args(argv)
    for view, n in run(a.ds).items():
        print(f"gold: {view} {a.ds}: {n:,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GOLD_TABLES", "compute", "gold_path", "run"]
