"""Scoring latency: one ad request of 500 candidates, features + model + auction with prediction logging on, in
process (``streams.serving.scorer.Scorer``) on the CPU and on CUDA when present: the full ranker on every
candidate, and the funnel (a pre-ranker distilled from the same ranker picks the top ``--rank-top-k`` for it; the
share of requests where both showed the same ads is reported), vs the naive peer (the same
model scoring the candidates one at a time) and the pandas peer (the request as a DataFrame through
``trainers.data.encode``, then one batched call); then the HTTP service (``python -m streams.serving``) under
load: requests/s and latency with N keep-alive clients. The scorer is also measured while online versions (deltas
over the previous one, as the online trainer registers them) are promoted every 0.5 s: the reload cost.
Goal: p99 under 10 ms on the CPU for 500 candidates
including the feature fetch.

``python -m bench.scoring [--candidates 500 --requests 500 --threads 1,2 --clients 4 --http-seconds 8]``
(``make bench-scoring``). The model is the production-sized ranker (``settings.trainer``), untrained: latency
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import torch

from bench.online_read import populate
from feature_repo.online import OnlineReader
from infra.settings import Settings, get_settings
from infra.topics import with_topic_prefix
from schemas.features import N_CATEGORIES
from streams.serving.auction import run_auction
from streams.serving.prediction_log import PredictionLogger
from streams.serving.request_features import encode_request, request_frame
from streams.serving.scorer import AdRequest, Scorer, score_batch
from trainers import preranker
from trainers.data import InputSpec, concat, encode
from trainers.model import Ranker
from trainers.registry import Registry, module_bytes
from trainers.scoring import ScoringModel, load, save

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("features", "encode", "prerank", "model", "auction", "log")


PROMOTE_EVERY_S = 0.5


def make_requests(n: int, n_users: int, n_ads: int, candidates: int, rng: random.Random, tag: str) -> list[AdRequest]:
    now_ms = int(time.time() * 1000)
    out = []
    for i in range(n):
        ads = rng.sample(range(n_ads), candidates)
        out.append(AdRequest(f"{tag}-{i}", rng.randrange(n_users), "feed", "mobile", now_ms + i, 3, ads,
                             [a // 4 for a in ads], [a // 20 for a in ads], [a % N_CATEGORIES for a in ads],
                             [0.5 + (a % 11) / 4 for a in ads]))
    return out


def quantiles(ms: list[float]) -> tuple[float, float, float, float]:
    """p50, p99, mean and min: the min is what a request costs when nothing else wants the cores."""
    q = statistics.quantiles(ms, n=100)
    return q[49], q[98], statistics.mean(ms), min(ms)


def row(*cells) -> str:
    return "| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def delta_versions(registry: Registry, root: str, n: int) -> list[str]:
    """``n`` online versions of one line off ``root``, each a delta over the previous one (as the online trainer
    registers them): 2,000 rows of every large table and every dense parameter changed per version."""
    model = load(registry, root).model
    versions, parent = [], root
    torch.manual_seed(1)
    for _ in range(n):
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2 and param.shape[0] >= 4096:
                    param[torch.randint(0, param.shape[0], (2000,))] += 0.01
                else:
                    param.add_(1e-3)
        parent = save(registry, ScoringModel(model), "online", {"line_root": root}, base=parent)
        versions.append(parent)
    return versions


def in_process(settings: Settings, registry: Registry, reader: OnlineReader, logger: PredictionLogger,
               requests: list[AdRequest], device: str, threads: int, warmup: int = 30,
               promote: list[str] | None = None) -> tuple[list, list, dict]:
    """Latency of ``Scorer.serve`` (and of each stage) over ``requests``, and the CPU time of the calling thread
    (what the request costs, whatever else the machine runs; with one torch thread it includes the model). With
    ``promote``, those versions are promoted one every ``PROMOTE_EVERY_S`` while the requests run (the scorer's
    reload thread loads each: one delta applied over the version it serves)."""
    scorer = Scorer(settings, registry, reader=reader, logger=logger, device=device, threads=threads).start()
    stop = threading.Event()

    def promoter() -> None:
        for version in promote or []:
            if stop.wait(PROMOTE_EVERY_S):
                return
            registry.promote(version, reason="bench: reloads while serving")

    thread = threading.Thread(target=promoter, daemon=True)
    try:
        if promote:
            thread.start()
        for r in requests[:warmup]:
            scorer.serve(r)
        gc.collect()
        total, cpu, stages = [], [], {s: [] for s in STAGES}
        for r in requests[warmup:]:
            t0, c0 = time.perf_counter(), time.thread_time()
            out = scorer.serve(r)
            total.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
            for s in STAGES:
                stages[s].append(out.timings[s])
            stages.setdefault("shown", []).append([x.ad_id for x in out.shown])
        stages["reloads"] = scorer.reloads
        return total, cpu, stages
    finally:
        stop.set()
        scorer.close()


def with_preranker(settings: Settings, registry: Registry, reader: OnlineReader, requests: list[AdRequest]) -> str:
    """The promoted ranker again, with a pre-ranker distilled from it on ``requests``' encoded batches (features
    from the store, as served), registered and promoted: the funnel's version."""
    model = load(registry)
    batches = [encode_request(model.model.spec, reader.features(r.user_id, r.ad_ids), placement=r.placement,
                              device=r.device, campaign_ids=r.campaign_ids, advertiser_ids=r.advertiser_ids,
                              category_ids=r.category_ids).batch for r in requests]
    pre = preranker.distil(model, concat(batches))
    version = save(registry, model, "full", {"preranker": {"config": pre.config}},
                   extra={preranker.EXTRA_FILE: module_bytes(pre)})
    registry.promote(version, "bench: the funnel")
    return version


def same_shown(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests where two paths showed the same ads in the same slots."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def peer(settings: Settings, model: ScoringModel, reader: OnlineReader, requests: list[AdRequest],
         one_at_a_time: bool) -> tuple[list[float], list[float]]:
    """The same features, model and auction; the model called once per candidate (naive), or the request encoded
    through a pandas frame (``one_at_a_time=False``)."""
    s, cpu, out, cpu_ms = settings.serving, torch.device("cpu"), [], []
    for r in requests:
        t0, c0 = time.perf_counter(), time.thread_time()
        features = reader.features(r.user_id, r.ad_ids)
        context = dict(placement=r.placement, device=r.device, campaign_ids=r.campaign_ids,
                       advertiser_ids=r.advertiser_ids, category_ids=r.category_ids)
        if one_at_a_time:
            batch = encode_request(model.model.spec, features, **context).batch
            parts = [score_batch(model, batch.slice(slice(i, i + 1)), cpu) for i in range(len(batch))]
            scores = {k: np.concatenate([p[k] for p in parts]) for k in ("ctr", "cvr", "neg")}
        else:
            scores = score_batch(model, encode(request_frame(features, **context), model.model.spec), cpu)
        run_auction(np.asarray(r.bids), scores["ctr"], scores["cvr"], scores["neg"], ad_ids=np.asarray(r.ad_ids),
                    slots=r.slots, campaign_ids=np.asarray(r.campaign_ids), request_id=r.request_id,
                    quality_exponent=s.quality_exponent, reserve_ecpm=s.reserve_ecpm)
        out.append((time.perf_counter() - t0) * 1000)
        cpu_ms.append((time.thread_time() - c0) * 1000)
    return out, cpu_ms


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[int, float, list[float]]:
    """``clients`` threads, each on one keep-alive connection, POST bodies for ``seconds``: (requests, elapsed, ms)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        i = k
        while time.monotonic() < deadline[0]:
            t0 = time.perf_counter()
            conn.request("POST", "/score", body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"HTTP {response.status}")
                break
            latencies[k].append((time.perf_counter() - t0) * 1000)
            i += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"the service answered {errors[0]}")
    ms = [x for lat in latencies for x in lat]
    return len(ms), elapsed, ms


def serve_http(settings: Settings, threads: int, requests: list[AdRequest], clients: list[int],
               seconds: float) -> list[str]:
    port = free_port()
    env = {**os.environ, **settings.to_env(), "ADS_SERVING__PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "streams.serving", "--threads", str(threads)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the scoring service did not start")
            time.sleep(0.3)
        bodies = [orjson.dumps({k: list(v) if isinstance(v, list | tuple) else v for k, v in r.__dict__.items()})
                  for r in requests]
        http_load(port, bodies[:50], 1, 2.0)  # warm-up: every candidate ad in the service's cache
        rows = []
        for n in clients:
            count, elapsed, ms = http_load(port, bodies, n, seconds)
            rows.append(row(n, count, count / elapsed, *quantiles(ms)[:3]))
            print(f"bench: http with {n} clients: {count / elapsed:.0f} requests/s", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    p.add_argument("--ads", type=int, default=5_000)
    p.add_argument("--users", type=int, default=1_000)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--requests", type=int, default=300, help="measured in-process requests per configuration")
    p.add_argument("--naive-requests", type=int, default=5, help="at least 2")
    p.add_argument("--threads", default="1", help="torch intra-op thread counts to measure on the CPU, e.g. 1,2,4")
    p.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu or cuda")
    p.add_argument("--clients", default="1,4", help="concurrent HTTP clients (0: skip the HTTP service)")
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument("--reload-versions", type=int, default=20, help="delta versions promoted while serving")
    p.add_argument("--rank-top-k", type=int, default=50, help="the funnel: candidates the ranker scores")
    a = p.parse_args(argv)
    rng = random.Random(17)
    base = get_settings()
    run = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"var_dir": base.var_dir / "bench-scoring" / run,
                                       "feast_project": f"benchscore{run}"})
    settings = with_topic_prefix(settings, f"bench{run}")
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"rank_top_k": a.rank_top_k})})
    populate(settings, a.ads, a.users, rng)
    registry = Registry(settings.registry_dir)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    torch.manual_seed(0)
    plain = save(registry, ScoringModel(Ranker.from_settings(spec, settings.trainer)), "full", {})
    registry.promote(plain, "bench: the ranker alone")
    reader = OnlineReader(settings)
    reader.features(0, list(range(a.ads)))  # warm: every ad in the cache, as a serving process would be
    reader.start()
    logger = PredictionLogger(settings).start()
    devices = ["cpu"] + (["cuda"] if a.device in ("auto", "cuda") and torch.cuda.is_available() else [])
    if a.device == "cuda" and "cuda" not in devices:
        raise SystemExit("--device cuda: CUDA is not available")
    requests = make_requests(a.requests + 30, a.users, a.ads, a.candidates, rng, "b")
    gc.freeze()
    results, breakdown = [], []
    for device in devices:
        for threads in [int(t) for t in a.threads.split(",")] if device == "cpu" else [1]:
            total, cpu, stages = in_process(settings, registry, reader, logger, requests, device, threads)
            full_shown = stages["shown"]
            results.append(row(f"scorer, full ranker on every candidate ({device})", threads, len(total),
                               *quantiles(total), statistics.median(cpu)))
            breakdown.append(row(f"{device}, {threads} thread(s)",
                                 *[f"{quantiles(stages[s])[0]:.2f} / {quantiles(stages[s])[1]:.2f}" for s in STAGES]))
            print(f"bench: in process on {device} with {threads} thread(s): p99 {quantiles(total)[1]:.2f} ms",
                  flush=True)
    funnel = with_preranker(settings, registry, reader,
                            make_requests(200, a.users, a.ads, a.candidates, rng, "distil"))
    total, cpu, stages = in_process(settings, registry, reader, logger, requests, "cpu", 1)
    agree = same_shown(stages["shown"], full_shown)
    results.append(row(f"scorer, funnel: pre-ranker on every candidate, ranker on the top {a.rank_top_k} (cpu; "
                       f"same ads shown as the full ranker in {100 * agree:.0f} % of requests)", 1, len(total),
                       *quantiles(total), statistics.median(cpu)))
    breakdown.append(row(f"funnel (top {a.rank_top_k}), cpu, 1 thread",
                         *[f"{quantiles(stages[s])[0]:.2f} / {quantiles(stages[s])[1]:.2f}" for s in STAGES]))
    print(f"bench: funnel in process: p99 {quantiles(total)[1]:.2f} ms, same ads as the full ranker in "
          f"{100 * agree:.1f} % of requests", flush=True)
    registry.promote(plain, "bench: the ranker alone")  # the reload row and the peers: the full ranker
    deltas = delta_versions(registry, registry.promoted(), a.reload_versions)
    total, cpu, stages = in_process(settings, registry, reader, logger, requests, "cpu", 1, promote=deltas)
    results.append(row(f"scorer, a new delta version promoted every {PROMOTE_EVERY_S:g} s (cpu; "
                       f"{stages['reloads']} reloads)", 1, len(total), *quantiles(total), statistics.median(cpu)))
    print(f"bench: in process with reloads running: p99 {quantiles(total)[1]:.2f} ms, {stages['reloads']} reloads",
          flush=True)
    registry.promote(deltas[0], reason="bench")  # the peers below score with one model, as before
    torch.set_num_threads(1)
    model = load(registry)
    naive, cpu = peer(settings, model, reader, requests[: a.naive_requests], one_at_a_time=True)
    results.append(row("naive peer: one candidate per model call (cpu)", 1, len(naive), *quantiles(naive),
                       statistics.median(cpu)))
    frame, cpu = peer(settings, model, reader, requests[30: 30 + min(a.requests, 100)], one_at_a_time=False)
    results.append(row("pandas peer: request as a DataFrame + encode (cpu)", 1, len(frame), *quantiles(frame),
                       statistics.median(cpu)))
    logged = logger.stats()
    assert logger.flush(30), "the prediction log did not drain"
    reader.close()
    logger.close()
    clients = [int(c) for c in a.clients.split(",") if int(c) > 0]
    registry.promote(funnel, reason="bench: the HTTP service serves the funnel, as production does")
    http_rows = serve_http(settings, 1, requests, clients, a.http_seconds) if clients else []

    load1 = os.getloadavg()[0]
    print(f"\nOne ad request: 1 user + {a.candidates} candidates (features from Redis, production-sized ranker, "
          f"auction with frequency caps, prediction logging on); {os.cpu_count()} CPU cores, "
          f"load average {load1:.1f} at the end (ms; CPU: the calling thread's CPU time, which leaves out time spent "
          "waiting for Redis or for a core)\n")
    print("| path | torch threads | requests | p50 | p99 | mean | min | CPU p50 |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(results))
    print("\nStages of the scorer, p50 / p99 (ms)\n")
    print("| configuration | " + " | ".join(STAGES) + " |\n|---|" + "---|" * len(STAGES))
    print("\n".join(breakdown))
    if http_rows:
        print(f"\nHTTP service (`python -m streams.serving`, one uvicorn worker, 1 torch thread, the funnel: ranker on "
              f"the top {a.rank_top_k}), keep-alive clients\n")
        print("| clients | requests | requests/s | p50 | p99 | mean |\n|---|---|---|---|---|---|")
        print("\n".join(http_rows))
    print(f"\nPrediction log: {logged['logged']:,} records logged, {logged['dropped']:,} dropped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
