"""One ranking request, 1 user + 500 candidate ads, every feature of the ranker's feature service, four read
paths on the same requests, each warmed up first and then measured on the same number of requests (``--requests``,
default 1,000, starting at least ``--interval-ms`` apart):

- ours with the ad cache (``feature_repo.online.OnlineReader``): ad rows in memory, reloaded when changed; user
  rows per request. A cache: an ad-side value may be up to its staleness behind Redis;
- ours without the cache (``OnlineReader(ad_cache=False)``): every row read from Redis in the request;
- Feast's ``get_online_features`` for the ``ranker`` feature service;
- a raw redis-py pipeline of the same hashes with per-value protobuf decoding (the floor for storage reads in
  Python).

Goal: p99 under 5 ms for the whole request. ``python -m bench.online_read [--ads 20000 --users 5000]``
(``make bench-online``). Another process rewrites ad rows during every row's requests, as the real-time
worker would.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from feature_repo.online import OnlineReader, OnlineWriter, entity_key, field_key, from_value
from feature_repo.store import feature_store
from infra.settings import get_settings
from schemas.features import BY_VIEW, N_CATEGORIES
from tests.test_online_store import random_row


def populate(settings, n_ads: int, n_users: int, rng: random.Random) -> None:
    """Every entity's rows, written as of an hour ago: within every view's TTL for a request made now (a fixed
    date here once aged past the TTLs, and the benches measured the path of a store without fresh rows)."""
    writer, ts = OnlineWriter(settings), datetime.now(UTC) - timedelta(hours=1)
    n_adv = max(n_ads // 20, 1)
    plan = [("user_features", [{"user_id": u} for u in range(n_users)]),
            ("user_realtime", [{"user_id": u} for u in range(n_users)]),
            ("user_category_features", [{"user_id": u, "category_id": c} for u in range(n_users)
                                        for c in range(N_CATEGORIES)]),
            ("ad_features", [{"ad_id": a} for a in range(n_ads)]),
            ("ad_realtime", [{"ad_id": a} for a in range(n_ads)]),
            ("advertiser_features", [{"advertiser_id": v} for v in range(n_adv)]),
            ("advertiser_realtime", [{"advertiser_id": v} for v in range(n_adv)])]
    for view, keys in plan:
        table = BY_VIEW[view]
        for i in range(0, len(keys), 5000):
            rows = [random_row(table, k, rng, ts) for k in keys[i:i + 5000]]
            if view == "ad_features":
                for r in rows:
                    r["ad_advertiser_id"] = rng.randrange(n_adv)
            writer.write(table, rows)
        print(f"bench: wrote {len(keys):,} {view} rows", flush=True)


def churn(settings, n_ads: int, rows_per_s: float, stop) -> None:
    """Another process (the real-time worker's role): rewrites ``rows_per_s`` random ads' real-time rows."""
    writer, rng, table = OnlineWriter(settings), random.Random(5), BY_VIEW["ad_realtime"]
    while not stop.is_set():
        t0 = time.monotonic()
        batch = [random_row(table, {"ad_id": rng.randrange(n_ads)}, rng, datetime.now(UTC))
                 for _ in range(int(rows_per_s / 10))]
        writer.write(table, batch)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))


def raw_pipeline(client, project: str, user: int, ads: list[int], n_adv: int) -> dict:
    """Every hash of the request in one redis-py pipeline, each value decoded with protobuf."""
    fields = {v: [(n, field_key(v, n)) for n in BY_VIEW[v].feature_names()] for v in BY_VIEW}
    pipe = client.pipeline(transaction=False)
    user_views = ("user_features", "user_realtime")
    pipe.hmget(entity_key({"user_id": user}, project), [k for v in user_views for _, k in fields[v]])
    for c in range(N_CATEGORIES):
        pipe.hmget(entity_key({"user_id": user, "category_id": c}, project),
                   [k for _, k in fields["user_category_features"]])
    for a in ads:
        pipe.hmget(entity_key({"ad_id": a}, project), [k for v in ("ad_features", "ad_realtime") for _, k in fields[v]])
    for a in ads:  # the candidates' advertisers (the peer does not know them in advance: one more key per ad)
        pipe.hmget(entity_key({"advertiser_id": a % n_adv}, project),
                   [k for v in ("advertiser_features", "advertiser_realtime") for _, k in fields[v]])
    return {i: [from_value(x) for x in reply] for i, reply in enumerate(pipe.execute())}


def row(name: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"| {name} | {len(ms)} | {q[49]:.2f} | {q[98]:.2f} | {statistics.mean(ms):.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.online_read", description=__doc__)
    p.add_argument("--ads", type=int, default=20_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--requests", type=int, default=1_000, help="measured requests, the same for every read path")
    p.add_argument("--warmup", type=int, default=50, help="requests run first and not measured, for every read path")
    p.add_argument("--interval-ms", type=float, default=10.0,
                   help="requests start at least this far apart (so the cached path's 1,000 run through reloads)")
    p.add_argument("--refresh-s", type=float, default=2.0)
    p.add_argument("--churn", type=float, default=2000.0,
                   help="ad rows rewritten per second by another process while requests are measured")
    a = p.parse_args(argv)
    rng = random.Random(11)
    base = get_settings()
    settings = base.model_copy(update={"var_dir": base.var_dir / "bench-online",
                                       "feast_project": f"bench{uuid.uuid4().hex[:6]}"})
    populate(settings, a.ads, a.users, rng)
    store = feature_store(settings, "redis")
    service = store.get_feature_service("ranker")
    requests = [(rng.randrange(a.users), rng.sample(range(a.ads), a.candidates)) for _ in range(a.requests)]

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    writer = ctx.Process(target=churn, args=(settings, a.ads, a.churn, stop), daemon=True)
    writer.start()
    reader = OnlineReader(settings, refresh_s=a.refresh_s)
    reader.features(0, list(range(a.ads)))  # warm: every ad in the cache, as a serving process would be
    reader.start()
    while reader.refreshes < 1:  # the refresher's first pass reads every ad; later ones only what changed
        time.sleep(0.1)
    gc.collect()
    gc.freeze()  # what a serving process does after loading (the same for every contestant)

    def timed(fn, warmup: int) -> list[float]:
        """``fn`` on ``warmup`` requests (not measured: imports, connections, caches), then on every request."""
        for user, ads in requests[:warmup]:
            fn(user, ads)
        out = []
        for user, ads in requests:
            t0 = time.perf_counter()
            fn(user, ads)
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(max(0.0, t0 + a.interval_ms / 1000 - time.perf_counter()))  # requests arrive over time
        return out

    n_adv = max(a.ads // 20, 1)
    results = {}
    results["ours, ad cache on"] = timed(reader.features, a.warmup)
    refreshes = reader.refreshes - 1
    print("bench: ours with the cache done", flush=True)
    # The entity rows Feast needs (the ads' advertisers and categories), known before its clock starts, as a
    # serving process would know them from its catalog.
    entity_rows = {}
    for user, ads in requests:
        got = reader.features(user, ads).to_feast_dict()
        entity_rows[id(ads)] = [{"user_id": user, "ad_id": ad, "advertiser_id": v, "category_id": c}
                                       for ad, v, c in zip(ads, got["advertiser_id"], got["category_id"], strict=True)]
    reader.close()
    uncached = OnlineReader(settings, ad_cache=False)
    results["ours, ad cache off"] = timed(uncached.features, a.warmup)
    print("bench: ours without the cache done", flush=True)
    results["feast"] = timed(lambda user, ads: store.get_online_features(
        features=service, entity_rows=entity_rows[id(ads)], full_feature_names=True).to_dict(), a.warmup)
    print("bench: feast done", flush=True)
    results["raw"] = timed(lambda user, ads: raw_pipeline(uncached.client, settings.feast_project, user, ads, n_adv),
                           a.warmup)
    stop.set()
    writer.join()
    print(f"\nOne request: 1 user + {a.candidates} ads, {sum(len(t.feature_names()) for t in BY_VIEW.values())} "
          f"features in 7 views; {a.ads:,} ads, {a.users:,} users in Redis (ms)\n")
    print(f"| read path ({a.warmup} warm-up requests each, not measured) | requests | p50 | p99 | mean |")
    print("|---|---|---|---|---|")
    print(row(f"ours, ad cache on (a cache: ad-side values up to {reader.staleness_s:.0f} s behind Redis), "
              "user rows per request", results["ours, ad cache on"]))
    print(row("ours, ad cache off: every row read from Redis in the request", results["ours, ad cache off"]))
    print(row("Feast get_online_features (the ranker feature service)", results["feast"]))
    print(row("raw redis-py pipeline of the same hashes + protobuf decoding", results["raw"]))
    print(f"\nWhile measured, another process rewrote {a.churn:,.0f} ad rows/s; the cached ad table was reloaded "
          f"{refreshes} times while its requests ran.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
