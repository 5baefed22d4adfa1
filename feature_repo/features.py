"""The feature repository: entities, sources on the gold Delta tables, batch and push feature views, and
the ranker's feature service. ``cd feature_repo && feast apply`` registers them.

Every view's fields come from its table in ``schemas.features`` (one definition), and every source path
from the settings (``ADS_VAR_DIR``), so the repo reads the same lake the batch jobs write.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, PushSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.table_format import DeltaFormat
from feast.types import Array, Float64, Int64
from feast.value_type import ValueType

from feature_repo.online import TTL_S
from infra.settings import get_settings
from schemas.features import ALL_TABLES, LOG_ORDER, FeatureRow

FEAST_TYPES = {int: Int64, float: Float64, list[int]: Array(Int64), list[float]: Array(Float64)}
# How long a value stays valid when nothing newer came: gold is rebuilt daily, real-time rows on every event.
TTL = {realtime: timedelta(seconds=s) for realtime, s in TTL_S.items()}  # the serving rule's numbers

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a user")
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.INT64, description="an ad (creative)")
advertiser = Entity(name="advertiser", join_keys=["advertiser_id"], value_type=ValueType.INT64)
category = Entity(name="category", join_keys=["category_id"], value_type=ValueType.INT64,
                  description="an ad category (the advertiser's vertical)")
ENTITIES = {e.join_key: e for e in (user, ad, advertiser, category)}


def source(table: type[FeatureRow]):
    """Gold views read their Delta table; real-time views are pushed, with their logged rows as batch source."""
    folder = "realtime" if table.REALTIME else "gold"
    # A real-time view has several rows of one event time per entity (a late event rewrites the row): the one
    # written last is the row as of that time (``log_order``, batch_jobs.realtime_log).
    created = {"created_timestamp_column": LOG_ORDER} if table.REALTIME else {}
    batch = SparkSource(name=f"{table.VIEW}_source", path=str(get_settings().lake_dir / folder / table.VIEW),
                        file_format="parquet", table_format=DeltaFormat(), timestamp_field="event_timestamp",
                        **created)
    return PushSource(name=f"{table.VIEW}_push", batch_source=batch) if table.REALTIME else batch


def view(table: type[FeatureRow]) -> FeatureView:
    fields = [Field(name=n, dtype=FEAST_TYPES[table.model_fields[n].annotation]) for n in table.feature_names()]
    return FeatureView(name=table.VIEW, entities=[ENTITIES[k] for k in table.ENTITIES], ttl=TTL[table.REALTIME],
                       schema=fields, source=source(table), online=True,
                       tags={"kind": "realtime" if table.REALTIME else "batch"})


VIEWS = {table.VIEW: view(table) for table in ALL_TABLES}
# Feast finds definitions among a module's names: one name per view.
user_features, ad_features = VIEWS["user_features"], VIEWS["ad_features"]
advertiser_features, user_category_features = VIEWS["advertiser_features"], VIEWS["user_category_features"]
user_realtime, ad_realtime = VIEWS["user_realtime"], VIEWS["ad_realtime"]
advertiser_realtime = VIEWS["advertiser_realtime"]

ranker = FeatureService(name="ranker", features=list(VIEWS.values()),
                        description="every feature the ranker scores a (user, ad) with")
