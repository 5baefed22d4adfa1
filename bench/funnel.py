"""The funnel in the closed loop: revenue, CTR and latency of the whole funnel against the ranker on every ad.

``python -m bench.funnel [--hours 2] [--ads 1000] [--top-k 50] [--retrieve 500]`` (``make bench-funnel``; needs
the stack: Redis for the scorer's frequency caps and reads, Kafka for its prediction log).

One simulated world. The batch cadence's own code (``trainers.cadence.train_and_register``) trains the ranker,
the retrieval towers and the pre-ranker on the first day of open-loop traffic (ids and context: no feature
pipeline runs here, so the store is empty at serving, as it was in training). Then the closed loop's ad server
serves the next ``--hours`` hours three times, each from the same seed (the same requests: users, context and
times; pacing and the users' reactions follow what each arm showed):

1. **every ad, full ranker** (the peer): every live ad is a candidate and the ranker scores them all;
2. **retrieval + full ranker**: the towers' index gives ``--retrieve`` candidates, the ranker scores them all;
3. **funnel**: retrieval, then the pre-ranker picks the top ``--top-k`` by estimated eCPM for the ranker.

Per arm: impressions, expected CTR and revenue (the simulator's true pCTR and pCTCVR of what was shown, x the
price charged: far less noisy than the realized clicks and conversions, also reported), and the scorer's
latency per request (p50/p99; the ad server's retrieval time separately). Goal: the funnel's revenue and CTR
within 1 % of arm 1's.
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np
import pandas as pd
import torch

from feature_repo.online import OnlineReader
from infra.settings import Settings, get_settings
from infra.topics import with_topic_prefix
from streams.serving.prediction_log import PredictionLogger
from streams.serving.retrieval import Retriever
from streams.serving.scorer import Scorer
from streams.simulator.closed_loop import ClosedLoop, EveryAd, scorer_policy
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate
from trainers.cadence import train_and_register
from trainers.data import InputSpec, encode
from trainers.datasets import holdout_mask
from trainers.evaluate import START, downsample, truth_frame
from trainers.model import Ranker
from trainers.registry import Registry

NEGATIVE_RATE = 0.25
TRAIN_HOURS = 24


class TimedRetriever(Retriever):
    """A :class:`Retriever` that records how long each request's retrieval took (ms)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ms: list[float] = []

    def candidates(self, user_id: int, placement: str, device: str, event_time_ms: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = super().candidates(user_id, placement, device, event_time_ms)
        self.ms.append((time.perf_counter() - t0) * 1000)
        return out


def train(cfg: SimulatorConfig, settings: Settings) -> str:
    """The first ``TRAIN_HOURS`` of open-loop traffic through the batch cadence's training; returns the version."""
    frame = truth_frame(generate(cfg, settings).truth, 1.0)
    frame = frame[frame["impression_time_ms"] < cfg.start_ms + TRAIN_HOURS * 3_600_000]
    rows = downsample(frame, NEGATIVE_RATE)
    held = holdout_mask(rows["impression_id"], settings.trainer.calibration_share)
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    torch.manual_seed(cfg.seed)
    model = Ranker.from_settings(spec, settings.trainer)
    batch = encode(rows[~held], spec)
    model.fit_normalizer(batch.dense)
    version, _ = train_and_register(model, batch, rows[held].reset_index(drop=True), settings=settings,
                                    cadence="full", data_range=["bench"], parent=None, negative_rate=NEGATIVE_RATE,
                                    epochs=settings.trainer.epochs, lr=settings.trainer.learning_rate,
                                    device=torch.device("cpu"), promote=True)
    return version


def serve_arm(name: str, cfg: SimulatorConfig, settings: Settings, hours: range, source, top_k: int) -> dict:
    """One arm: a fresh closed loop (same seed) and scorer; the shown rows with their truth, and latencies."""
    arm = settings.model_copy(update={"feast_project": f"{settings.feast_project}{name}",
                                      "serving": settings.serving.model_copy(update={"rank_top_k": top_k})})
    registry = Registry(arm.registry_dir)
    logger = PredictionLogger(arm).start()
    reader = OnlineReader(arm)  # the empty store of this arm: as in training, no features (and no refresh)
    scorer = Scorer(arm, registry, reader=reader, logger=logger, threads=1).start()
    loop = ClosedLoop(cfg, arm, source=source)
    frames, ms = [], []
    policy = scorer_policy(scorer)

    def timed(req):
        t0 = time.perf_counter()
        out = policy(req)
        ms.append((time.perf_counter() - t0) * 1000)
        return out

    try:
        for hour in hours:
            t0 = time.monotonic()
            frames.append(loop.serve_hour(hour, timed))
            print(f"bench-funnel: {name}: hour {hour}: {len(frames[-1]):,} impressions in "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
        assert logger.flush(60), "the prediction log did not drain"
    finally:
        scorer.close()
        logger.close()
    shown = pd.concat(frames, ignore_index=True)
    retrieval_ms = getattr(source, "ms", [])
    return {"arm": name, "shown": shown, "ms": ms, "retrieval_ms": retrieval_ms}


def summarize(result: dict) -> dict:
    shown = result["shown"]
    expected_revenue = float((shown["true_pctr"] * shown["true_pcvr"] * shown["price"]).sum())
    expected_value = float((shown["true_pctr"] * shown["true_pcvr"] * shown["bid"]).sum())
    realized = float(shown.loc[shown["converted_in_window"], "price"].sum())
    q = np.percentile(result["ms"], [50, 99])
    r = np.percentile(result["retrieval_ms"], [50, 99]) if result["retrieval_ms"] else [np.nan, np.nan]
    return {"arm": result["arm"], "impressions": len(shown), "requests": shown["request_id"].nunique(),
            "expected_ctr": float(shown["true_pctr"].mean()), "expected_revenue": expected_revenue,
            "expected_value": expected_value, "price_share": float(shown["price"].sum() / shown["bid"].sum()),
            "top_ads": shown[shown["position"] == 0].set_index("request_id")["ad_id"],
            "clicks": int(shown["clicked"].sum()), "realized_revenue": realized,
            "scorer_p50": float(q[0]), "scorer_p99": float(q[1]), "retrieval_p50": float(r[0]),
            "retrieval_p99": float(r[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.funnel", description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=int, default=2, help="closed-loop hours served per arm")
    p.add_argument("--ads", type=int, default=1_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--impressions-per-hour", type=int, default=4_000)
    p.add_argument("--top-k", type=int, default=50, help="candidates the ranker scores in the funnel")
    p.add_argument("--retrieve", type=int, default=500, help="candidates retrieval gives per request")
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    base = get_settings()
    run = uuid.uuid4().hex[:6]
    settings = base.model_copy(update={"var_dir": base.var_dir / "bench-funnel" / run,
                                       "feast_project": f"benchfunnel{run}"})
    settings = with_topic_prefix(settings, f"benchfunnel{run}")
    cfg = SimulatorConfig(seed=a.seed, start=START, hours=TRAIN_HOURS + a.hours, users=a.users, ads=a.ads,
                          impressions_per_hour=a.impressions_per_hour, ctr=0.05, cvr=0.1, speed=0,
                          prediction_log=False)
    t0 = time.monotonic()
    version = train(cfg, settings)
    print(f"bench-funnel: trained and registered {version} in {time.monotonic() - t0:.0f} s", flush=True)
    hours = range(TRAIN_HOURS, TRAIN_HOURS + a.hours)
    registry = Registry(settings.registry_dir)

    def retriever(name: str) -> TimedRetriever:
        reader = OnlineReader(settings.model_copy(update={"feast_project": f"{settings.feast_project}{name}"}))
        return TimedRetriever(registry, reader, k=a.retrieve)

    arms = [("every ad, full ranker", EveryAd(), 0, "all"),
            ("retrieval, full ranker", retriever("ret"), 0, "ret"),
            ("funnel", retriever("fun"), a.top_k, "fun")]
    results = [summarize(serve_arm(tag, cfg, settings, hours, source, k)) for _, source, k, tag in arms]
    peer = results[0]
    print(f"\nOne world ({a.users:,} users, {a.ads:,} ads, seed {a.seed}); the ranker, towers and pre-ranker trained "
          f"on {TRAIN_HOURS} h of open-loop traffic; {a.hours} closed-loop hours per arm on the same requests; "
          f"retrieval k={a.retrieve} (exhaustive below 100k ads), ranker on the pre-ranker's top {a.top_k}; one "
          "torch thread (ms)\n")
    print("| arm | requests | impressions | top ad as peer | expected CTR | vs peer | expected revenue | vs peer | "
          "expected value at bid | vs peer | price / bid | clicks | realized revenue | scorer p50 | scorer p99 | "
          "retrieval p50 | retrieval p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (label, *_), r in zip(arms, results, strict=True):
        same = r["top_ads"].reindex(peer["top_ads"].index) == peer["top_ads"]
        print(f"| {label} | {r['requests']:,} | {r['impressions']:,} | {100 * same.mean():.1f} % | "
              f"{r['expected_ctr']:.5f} | {100 * (r['expected_ctr'] / peer['expected_ctr'] - 1):+.2f} % | "
              f"{r['expected_revenue']:,.1f} | {100 * (r['expected_revenue'] / peer['expected_revenue'] - 1):+.2f} % | "
              f"{r['expected_value']:,.1f} | {100 * (r['expected_value'] / peer['expected_value'] - 1):+.2f} % | "
              f"{r['price_share']:.3f} | {r['clicks']:,} | {r['realized_revenue']:,.1f} | {r['scorer_p50']:.2f} | "
              f"{r['scorer_p99']:.2f} | {r['retrieval_p50']:.2f} | {r['retrieval_p99']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
