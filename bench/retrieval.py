"""Candidate retrieval: the two-tower model's HNSW index against exhaustive scoring by the same towers.

``python -m bench.retrieval [--requests 1000] [--large 200000]``

One simulated world (20,000 users, 2,000 ads, 12,000 impressions an hour, as ``make evaluate``'s full scale): the
towers train on two days of clicks (``trainers.retrieval.train_two_tower``), and each held-out request (a clicked
impression of the third day: its user, context and recent ads) asks for 500 candidates. Per request, one at a
time on one thread, warmed up first: the user tower, then the index's search (HNSW, faiss) or every ad scored
(exhaustive: one matrix product and a partial sort, numpy), with recall@500 of the index against the exhaustive
top 500. Two catalogs: the world's ads, and a large one (``--large`` ads: the world's ads plus new ones with the
world's advertisers, campaigns and categories; their hashed ids share embedding rows with trained ones). What
the towers retrieve: the share of held-out clicks whose ad is in the user's top k, against the k most clicked
ads of the training days (popularity, how the simulator's ad server draws candidates today).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.settings import get_settings
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate
from trainers.data import InputSpec, encode
from trainers.evaluate import DAY_MS, START, truth_frame
from trainers.retrieval import AD_FIELDS, AdIndex, Catalog, recall, train_two_tower

K = 500


def world(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """History (2 days) and held-out day of one world, and its catalog (one row per ad)."""
    cfg = SimulatorConfig(seed=seed, start=START, hours=72, users=20_000, ads=2_000, impressions_per_hour=12_000,
                          ctr=0.05, cvr=0.1, speed=0, prediction_log=False)
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as var:  # the run's truth files, read back here
        frame = truth_frame(generate(cfg, get_settings().model_copy(update={"var_dir": Path(var)})).truth, 1.0)
    day = (frame["impression_time_ms"].to_numpy() - cfg.start_ms) // DAY_MS
    return frame[day < 2], frame[day == 2], frame.drop_duplicates("ad_id")[list(AD_FIELDS)]


def large_catalog(ads: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``ads`` plus new ads up to ``n``, each with the advertiser, campaign and category of a random world ad."""
    rng = np.random.default_rng(seed)
    extra = ads.iloc[rng.integers(0, len(ads), n - len(ads))].copy()
    extra["ad_id"] = np.arange(len(extra)) + int(ads["ad_id"].max()) + 1
    return pd.concat([ads, extra], ignore_index=True)


def per_request(fn, queries: np.ndarray, warmup: int = 50) -> tuple[np.ndarray, list]:
    """Milliseconds of ``fn(one query)`` per query, after ``warmup`` untimed calls; and the results."""
    for q in queries[:warmup]:
        fn(q[None, :])
    ms, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q[None, :])[0])
        ms.append((time.perf_counter() - t0) * 1000)
    return np.array(ms), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000)
    p.add_argument("--large", type=int, default=200_000, help="ads in the large catalog")
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    settings = get_settings()
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    print("bench-retrieval: simulating the world ...", flush=True)
    history, held, ads = world(a.seed)
    t0 = time.perf_counter()
    model = train_two_tower(encode(history, spec), spec, epochs=3, seed=a.seed)
    print(f"bench-retrieval: towers trained in {time.perf_counter() - t0:.1f} s", flush=True)
    clicks = held[held["clicked"]].head(a.requests)
    batch = encode(clicks, spec)

    def user_vector(i: int) -> np.ndarray:
        with torch.inference_mode():
            return model.user_vectors(batch.sparse[i:i + 1], batch.history[i:i + 1]).numpy()

    tower_ms = []
    for i in range(min(50, len(clicks))):
        user_vector(i)
    for i in range(len(clicks)):
        t = time.perf_counter()
        user_vector(i)
        tower_ms.append((time.perf_counter() - t) * 1000)
    with torch.inference_mode():
        users = model.user_vectors(batch.sparse, batch.history).numpy()

    rows = []
    for name, catalog_frame in (("world", ads), (f"large ({a.large:,} ads)", large_catalog(ads, a.large, a.seed))):
        catalog = Catalog.from_frame(catalog_frame, spec)
        t = time.perf_counter()
        index = AdIndex(model, catalog)
        build_s = time.perf_counter() - t
        print(f"bench-retrieval: {name}: {len(index):,} ads indexed in {build_s:.1f} s", flush=True)
        exact_ms, exact = per_request(lambda q, index=index: index.exact(q, K), users)
        ann_ms, approx = per_request(lambda q, index=index: index.search(q, K), users)
        r = recall(np.array(approx), np.array(exact))
        rows.append((name, len(index), build_s, exact_ms, ann_ms, r))

    print(f"\n{len(clicks):,} requests (held-out clicked impressions), one at a time, 1 thread; k = {K}\n")
    print("| catalog | ads | index build s | exhaustive p50 / p99 ms | HNSW p50 / p99 ms | recall@500 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, build_s, exact_ms, ann_ms, r in rows:
        print(f"| {name} | {n:,} | {build_s:.1f} | {np.percentile(exact_ms, 50):.2f} / "
              f"{np.percentile(exact_ms, 99):.2f} | {np.percentile(ann_ms, 50):.2f} / {np.percentile(ann_ms, 99):.2f}"
              f" | {r:.4f} |")
    print(f"\nuser tower per request: p50 {np.percentile(tower_ms, 50):.2f} ms, p99 {np.percentile(tower_ms, 99):.2f}")

    popular = history.groupby("ad_id").size().sort_values(ascending=False).index.to_numpy()
    clicked_ad = clicks["ad_id"].to_numpy()
    world_index = AdIndex(model, Catalog.from_frame(ads, spec))
    print("\n| held-out clicks whose ad is in the top k | k = 50 | k = 100 | k = 500 |")
    print("|---|---:|---:|---:|")
    cells = {"two-tower (exhaustive)": [], "popularity (training days' clicks)": []}
    for k in (50, 100, 500):
        top = world_index.exact(users, k)
        cells["two-tower (exhaustive)"].append(np.mean([c in set(t) for c, t in zip(clicked_ad, top, strict=True)]))
        cells["popularity (training days' clicks)"].append(np.isin(clicked_ad, popular[:k]).mean())
    for name, values in cells.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print(f"\n(the world has {len(ads):,} ads: k = 500 is {K / len(ads):.0%} of them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
