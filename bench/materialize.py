"""Loading feature rows into Redis in Feast's layout: ``feast materialize`` (from the gold Delta table)
vs our bulk loader (``feature_repo.bulk``, 1 and 2 processes) vs sending the same pre-encoded bytes as
pipelined HSETs over one connection (the ceiling: no encoding at all). Goal: >= 250k rows/s.

``python -m bench.materialize --rows 1000000`` (``make bench-materialize``). Feast runs on
``--feast-rows`` (default 100k) rows: at its rate, a million would take minutes. Rows: ``ad_features``
(11 features: 6 integers, 5 doubles).
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.materialize", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--feast-rows", type=int, default=100_000)
    a = p.parse_args(argv)
    base = get_settings()
    settings = base.model_copy(update={"var_dir": base.var_dir / "bench-materialize",
                                       "feast_project": f"bench{uuid.uuid4().hex[:6]}"})
    os.environ["ADS_VAR_DIR"] = str(settings.var_dir)  # the repo's sources read the lake from the settings
    get_settings.cache_clear()
    rows = frame(a.rows)
    results = []

    from infra.spark_session import spark_session

    spark = spark_session("bench-materialize", settings)
    small = rows.head(a.feast_rows).assign(ds="2026-11-20")
    path = str(settings.lake_dir / "gold" / AdFeatures.VIEW)
    spark.createDataFrame(small).write.format("delta").mode("overwrite").partitionBy("ds").save(path)
    store = feature_store(settings, "redis")
    start = datetime(2026, 11, 19, tzinfo=UTC)
    s = timed(lambda: store.materialize(start, start + timedelta(days=3), feature_views=[AdFeatures.VIEW]))
    results.append(("feast materialize (Spark offline store -> Redis)", len(small), s))
    print(f"bench: feast materialize {len(small):,} rows in {s:.1f}s", flush=True)

    for procs in (1, 2):
        s = timed(lambda procs=procs: bulk_write(settings, AdFeatures, rows, processes=procs))
        results.append((f"ours: bulk loader, {procs} process{'es' if procs > 1 else ''}", len(rows), s))
        print(f"bench: bulk loader x{procs}: {len(rows):,} rows in {s:.1f}s", flush=True)
    commands = encode_rows(AdFeatures, rows, settings.feast_project)
    s = timed(lambda: send(settings, commands))
    results.append(("ceiling: the same bytes, pipelined HSET on one connection", len(rows), s))

    sample = random.Random(3).sample(range(a.rows), 200)
    got = store.get_online_features(features=[f"ad_features:{n}" for n in AdFeatures.feature_names()],
                                    entity_rows=[{"ad_id": i} for i in sample]).to_dict()
    for name in AdFeatures.feature_names():
        assert got[name] == rows[name].iloc[sample].tolist(), name  # Feast reads back what we wrote

    print("\nLoading ad_features rows into Redis (Feast's layout; read back with get_online_features)\n")
    print("| path | rows | seconds | rows/s |\n|---|---|---|---|")
    for name, n, s in results:
        print(f"| {name} | {n:,} | {s:.2f} | {n / s:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
