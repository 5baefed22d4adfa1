"""Loading feature rows into Redis in Feast's layout, every path on the same rows (``--rows``, default 200k
``ad_features`` rows: 6 integers, 5 doubles). Goal: >= 250k rows/s. Two comparisons:

- **end to end from the gold Delta table** (one day's partition, the latest row per ad in the interval):
  ``feast materialize`` (its Spark offline store) against ours, ``make materialize``'s path
  (``feature_repo.materialize``: the quarantine check, Spark reads the latest row per ad, stored times compared,
  our bulk loader, the load recorded), each timed from the call to its return;
- **from the same in-memory frame**: Feast's ``write_to_online_store`` against our bulk loader (1 and 2
  processes), and the ceiling: the same pre-encoded bytes as pipelined HSETs on one connection (no encoding).

After each path, Feast's ``get_online_features`` reads back a sample of what it wrote (each path loads its own
project, so no path's rows can stand in for another's). ``python -m bench.materialize --rows 200000``
(``make bench-materialize``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from feature_repo.bulk import bulk_write, encode_rows, send
from feature_repo.loads import parse_materialize
from feature_repo.materialize import materialize
from feature_repo.store import feature_store
from infra.settings import get_settings
from schemas.features import AdFeatures


def frame(n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    out = {"event_timestamp": pd.Timestamp("2026-11-20", tz="UTC"), "ad_id": np.arange(n, dtype=np.int64)}
    for name in AdFeatures.feature_names():
        kind = AdFeatures.model_fields[name].annotation
        out[name] = rng.integers(0, 5000, n) if kind is int else rng.random(n)
    out["ad_category_id"] = rng.integers(0, 16, n)
    return pd.DataFrame(out)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check_read_back(store, rows: pd.DataFrame, n: int = 200) -> None:
    """Feast's ``get_online_features`` returns what was loaded, for a sample of ``rows``."""
    sample = random.Random(3).sample(range(len(rows)), min(n, len(rows)))
    got = store.get_online_features(features=[f"ad_features:{name}" for name in AdFeatures.feature_names()],
                                    entity_rows=[{"ad_id": int(rows["ad_id"].iloc[i])} for i in sample]).to_dict()
    for name in AdFeatures.feature_names():
        assert got[name] == rows[name].iloc[sample].tolist(), name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.materialize", description=__doc__)
    p.add_argument("--rows", type=int, default=200_000)
    a = p.parse_args(argv)
    base = get_settings()
    root = base.var_dir / "bench-materialize"
    os.environ["ADS_VAR_DIR"] = str(root)  # the repo's sources read the lake from the settings
    get_settings.cache_clear()

    def project(name: str):
        """Settings and a Feast store of a fresh project (its own Redis keys) over the shared lake."""
        settings = base.model_copy(update={"var_dir": root, "feast_project": f"bench{name}{uuid.uuid4().hex[:6]}"})
        return settings, feature_store(settings, "redis")

    rows = frame(a.rows)
    from infra.spark_session import spark_session

    settings, _ = project("lake")
    spark = spark_session("bench-materialize", settings)
    path = str(settings.lake_dir / "gold" / AdFeatures.VIEW)
    spark.createDataFrame(rows.assign(ds="2026-11-20")).write.format("delta").mode("overwrite") \
        .partitionBy("ds").save(path)
    start = datetime(2026, 11, 19, tzinfo=UTC)
    end = start + timedelta(days=3)
    spark.read.format("delta").load(path).count()  # warm: Spark's first job loads classes, for both paths
    results = []

    def record(name: str, seconds: float, store, loaded: pd.DataFrame) -> None:
        check_read_back(store, loaded)
        results.append((name, len(loaded), seconds))
        print(f"bench: {name}: {len(loaded):,} rows in {seconds:.1f}s", flush=True)

    settings, store = project("feast")
    s = timed(lambda: store.materialize(start, end, feature_views=[AdFeatures.VIEW]))
    record("end to end from Delta: feast materialize (Spark offline store -> Redis)", s, store, rows)
    settings, store = project("ours")
    spec = parse_materialize(["materialize", start.isoformat(), end.isoformat(), "--views", AdFeatures.VIEW])
    s = timed(lambda: materialize(settings, spec, spark))
    record("end to end from Delta: ours, `make materialize`'s path (feature_repo.materialize)", s, store, rows)

    settings, store = project("write")
    s = timed(lambda: store.write_to_online_store(AdFeatures.VIEW, df=rows))
    record("from the frame: Feast write_to_online_store", s, store, rows)
    for procs in (1, 2):
        settings, store = project(f"bulk{procs}")
        s = timed(lambda procs=procs, settings=settings: bulk_write(settings, AdFeatures, rows, processes=procs))
        record(f"from the frame: ours, bulk loader, {procs} process{'es' if procs > 1 else ''}", s, store, rows)
    settings, store = project("ceiling")
    commands = encode_rows(AdFeatures, rows, settings.feast_project)
    s = timed(lambda: send(settings, commands))
    record("ceiling: the same bytes, pipelined HSET on one connection (encoded beforehand)", s, store, rows)

    print(f"\nLoading {a.rows:,} ad_features rows into Redis (Feast's layout; each path's rows read back with "
          "get_online_features)\n")
    print("| path | rows | seconds | rows/s |\n|---|---|---|---|")
    for name, n, s in results:
        print(f"| {name} | {n:,} | {s:.2f} | {n / s:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
