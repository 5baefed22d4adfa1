"""Feature tables: the gold (batch) and real-time feature rows, and the training set, defined once.

Each class is one Feast feature view's rows (``VIEW`` names it, ``ENTITIES`` are its join keys): the
gold Delta tables, the Feast definitions in ``feature_repo/``, the real-time workers, the online read path,
the training-set builder and the data-quality suites all take their columns from here.

Feature names carry their entity's prefix (``user_``, ``ad_``, ...) so they are unique across views.

>>> [f for f in AdvertiserFeatures.feature_names()]
['advertiser_impressions_30d', 'advertiser_ctr_30d', 'advertiser_cvr_30d']
>>> UserCategoryFeatures.ENTITIES
('user_id', 'category_id')
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import LabeledImpression

N_CATEGORIES = 16  # ad categories (advertisers' verticals); the user's interest profile has one share each
RECENT_ADS = 30  # ads a user saw most recently, kept for fatigue and for the ranker's attention
Rate = Field(ge=0.0, le=1.0)
Count = Field(ge=0)


class FeatureRow(BaseModel):
    """One row of a feature view: entity keys, ``event_timestamp`` (when the values became true), features."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    VIEW: ClassVar[str]
    ENTITIES: ClassVar[tuple[str, ...]]
    # Pushed by the real-time workers (a Feast push source) rather than materialized from a gold table.
    REALTIME: ClassVar[bool] = False

    event_timestamp: datetime

    @classmethod
    def feature_names(cls) -> list[str]:
        return [n for n in cls.model_fields if n not in cls.ENTITIES and n != "event_timestamp"]


class UserFeatures(FeatureRow):
    """Per user, as of the end of a day: engagement over 1/7/30 days and the interest profile."""

    VIEW: ClassVar[str] = "user_features"
    ENTITIES: ClassVar[tuple[str, ...]] = ("user_id",)

    user_id: int = Field(ge=0)
    user_impressions_1d: int = Count
    user_clicks_1d: int = Count
    user_ctr_1d: float = Rate
    user_impressions_7d: int = Count
    user_clicks_7d: int = Count
    user_ctr_7d: float = Rate
    user_impressions_30d: int = Count
    user_clicks_30d: int = Count
    user_ctr_30d: float = Rate
    user_conversions_30d: int = Count
    user_cvr_30d: float = Rate
    # Share of the user's last-30-day impressions in each category (smoothed toward uniform), N_CATEGORIES long.
    user_category_profile: list[float] = Field(min_length=N_CATEGORIES, max_length=N_CATEGORIES)


class AdFeatures(FeatureRow):
    """Per ad: CTR/CVR smoothed toward its campaign's and advertiser's prior, campaign age, budget pacing."""

    VIEW: ClassVar[str] = "ad_features"
    ENTITIES: ClassVar[tuple[str, ...]] = ("ad_id",)

    ad_id: int = Field(ge=0)
    ad_campaign_id: int = Field(ge=0)
    ad_advertiser_id: int = Field(ge=0)
    ad_category_id: int = Field(ge=0, le=N_CATEGORIES - 1)
    ad_impressions_7d: int = Count
    ad_clicks_7d: int = Count
    ad_conversions_7d: int = Count
    ad_ctr_7d: float = Rate
    ad_cvr_7d: float = Rate
    ad_campaign_age_days: float = Field(ge=0.0)
    ad_budget_pacing: float = Field(ge=0.0, description="the campaign's spend that day over its daily budget")


class AdvertiserFeatures(FeatureRow):
    VIEW: ClassVar[str] = "advertiser_features"
    ENTITIES: ClassVar[tuple[str, ...]] = ("advertiser_id",)

    advertiser_id: int = Field(ge=0)
    advertiser_impressions_30d: int = Count
    advertiser_ctr_30d: float = Rate
    advertiser_cvr_30d: float = Rate


class UserCategoryFeatures(FeatureRow):
    """Per user and ad category over 30 days (the cross the ranker cannot learn from ids alone)."""

    VIEW: ClassVar[str] = "user_category_features"
    ENTITIES: ClassVar[tuple[str, ...]] = ("user_id", "category_id")

    user_id: int = Field(ge=0)
    category_id: int = Field(ge=0, le=N_CATEGORIES - 1)
    uc_impressions_30d: int = Count
    uc_clicks_30d: int = Count
    uc_ctr_30d: float = Rate


class UserRealtime(FeatureRow):
    """Per user, over event time up to ``event_timestamp``: counts in sliding windows, the session, and the
    ads seen last (newest first, for fatigue: time since the user last saw an ad or an advertiser)."""

    VIEW: ClassVar[str] = "user_realtime"
    ENTITIES: ClassVar[tuple[str, ...]] = ("user_id",)
    REALTIME: ClassVar[bool] = True

    user_id: int = Field(ge=0)
    user_impressions_1h: int = Count
    user_clicks_1h: int = Count
    user_impressions_6h: int = Count
    user_clicks_6h: int = Count
    user_impressions_24h: int = Count
    user_clicks_24h: int = Count
    user_session_depth: int = Field(ge=0, description="impressions since a gap of 30 min")
    user_recent_ad_ids: list[int] = Field(max_length=RECENT_ADS)
    user_recent_advertiser_ids: list[int] = Field(max_length=RECENT_ADS)
    user_recent_seen_ms: list[int] = Field(max_length=RECENT_ADS)


class AdRealtime(FeatureRow):
    VIEW: ClassVar[str] = "ad_realtime"
    ENTITIES: ClassVar[tuple[str, ...]] = ("ad_id",)
    REALTIME: ClassVar[bool] = True

    ad_id: int = Field(ge=0)
    ad_impressions_1h: int = Count
    ad_clicks_1h: int = Count
    ad_impressions_6h: int = Count
    ad_clicks_6h: int = Count
    ad_impressions_24h: int = Count
    ad_clicks_24h: int = Count


class AdvertiserRealtime(FeatureRow):
    VIEW: ClassVar[str] = "advertiser_realtime"
    ENTITIES: ClassVar[tuple[str, ...]] = ("advertiser_id",)
    REALTIME: ClassVar[bool] = True

    advertiser_id: int = Field(ge=0)
    advertiser_impressions_1h: int = Count
    advertiser_impressions_24h: int = Count


GOLD_TABLES: tuple[type[FeatureRow], ...] = (UserFeatures, AdFeatures, AdvertiserFeatures, UserCategoryFeatures)
REALTIME_TABLES: tuple[type[FeatureRow], ...] = (UserRealtime, AdRealtime, AdvertiserRealtime)
ALL_TABLES = GOLD_TABLES + REALTIME_TABLES
BY_VIEW: dict[str, type[FeatureRow]] = {t.VIEW: t for t in ALL_TABLES}


class TrainingRow(LabeledImpression):
    """A training-set row: a silver row plus its features as of the impression's event time (columns named
    ``<view>__<feature>``, added by the builder) and the rate its class was kept at by negative downsampling.

    A kept negative stands for ``1 / sample_rate`` negatives: calibration undoes the downsampling with
    ``p / (p + (1 - p) / sample_rate)``."""

    NAME: ClassVar[str] = "training_row"

    sample_rate: float = Field(gt=0.0, le=1.0)

# A landed real-time row's place in the log, as a timestamp (one microsecond per offset; batch_jobs.realtime_log):
# the real-time views' ``created_timestamp_column`` in Feast, which orders rows of one entity and one event time.
LOG_ORDER = "log_order"
