"""Open the feature store the way the project runs it: Redis online (``settings.online_store``), never a silent
fallback: with Redis down a materialization fails loudly instead of filling a store the scorer never reads.

The configuration is the repository's own ``feature_store.yaml`` (or ``feature_store.redis.yaml``), read
with Feast's loader, with the registry and the SQLite file moved under ``<var>/feast`` so each lake
(a test's, a demo's) has its own registry. :func:`write_config` writes that file for the ``feast`` CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from infra.settings import Settings

REPO = Path(__file__).resolve().parent
FEAST_REDIS_ENV = "ADS_FEAST_REDIS"


def redis_address(settings: Settings) -> str:
    """Feast's Redis connection string for the configured server (credentials included: it is handed over in
    the environment as ``ADS_FEAST_REDIS``, never written to a file)."""
    r = settings.redis
    tls = ",ssl=true" + (f",ssl_ca_certs={r.tls_ca_file}" if r.tls_ca_file else "") if r.tls else ""
    return (f"{r.host}:{r.port}" + (f",username={r.username}" if r.username else "")
            + (f",password={r.password}" if r.password else "") + tls)


def redis_up(settings: Settings) -> bool:
    from infra.redis_server import RedisServer

    return RedisServer(settings).ready()


class OnlineStoreDown(RuntimeError):
    """The configured online store does not answer."""


def write_config(settings: Settings, online: str | None = None) -> Path:
    """``<var>/feast/feature_store.yaml``: the repo's file for ``online`` (``redis`` | ``sqlite``; default:
    ``settings.online_store``), with the registry and SQLite paths moved under ``<var>/feast``. Raise
    :class:`OnlineStoreDown` when it is Redis and Redis does not answer."""
    online = online or settings.online_store
    if online == "redis" and not redis_up(settings):
        raise OnlineStoreDown(f"Redis is not reachable at {settings.redis.host}:{settings.redis.port}: the online "
                              "store the scorer reads. Start it (`make up`); set ADS_ONLINE_STORE=sqlite only for a "
                              "local store that nothing serves from.")
    source = REPO / ("feature_store.redis.yaml" if online == "redis" else "feature_store.yaml")
    # The connection string (it may hold a password) stays ``${ADS_FEAST_REDIS}`` in the written file: Feast
    # expands environment variables when it reads it, and this process and the feast CLI's get it from here.
    os.environ[FEAST_REDIS_ENV] = redis_address(settings)
    raw = yaml.safe_load(source.read_text())
    out_dir = settings.var_dir / "feast"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw["project"] = settings.feast_project
    raw["registry"] = str(out_dir / Path(raw["registry"]).name)
    if raw["online_store"]["type"] == "redis":
        from feature_repo.online import KEY_TTL_S

        raw["online_store"]["key_ttl_seconds"] = KEY_TTL_S  # as OnlineWriter's keys: quiet entities expire
    if raw["online_store"]["type"] == "sqlite":
        raw["online_store"]["path"] = str(out_dir / Path(raw["online_store"]["path"]).name)
    conf = raw["offline_store"]["spark_conf"]
    conf["spark.driver.extraClassPath"] = str((REPO / conf["spark.driver.extraClassPath"]).resolve())
    path = out_dir / "feature_store.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def ensure_offline_tables(spark, settings: Settings) -> list[str]:
    """Create an empty Delta table (schema from ``schemas.features``) for every view whose source is missing,
    so ``feast apply`` can validate every source before the first job or worker has written one."""
    from delta.tables import DeltaTable
    from pyspark.sql import types as T

    from schemas.features import ALL_TABLES, LOG_ORDER
    from schemas.spark import spark_schema

    made = []
    for table in ALL_TABLES:
        path = str(settings.lake_dir / ("realtime" if table.REALTIME else "gold") / table.VIEW)
        if not DeltaTable.isDeltaTable(spark, path):
            schema = spark_schema(table).add("ds", T.StringType())
            if table.REALTIME:  # the landed log's columns Feast reads (batch_jobs.realtime_log)
                schema = schema.add(LOG_ORDER, T.TimestampType())
            spark.createDataFrame([], schema).write.format("delta").partitionBy("ds").mode("ignore").save(path)
            made.append(path)
    return made


def feature_store(settings: Settings, online: str | None = None, apply: bool = True):
    """A ``FeatureStore`` on this lake; with ``apply``, the repo's definitions are registered first."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(REPO), fs_yaml_file=write_config(settings, online))
    if apply:
        from feature_repo import features

        store.apply([*features.ENTITIES.values(), *features.VIEWS.values(), features.ranker,
                     *[v.stream_source for v in features.VIEWS.values() if v.stream_source is not None]])
    return store
