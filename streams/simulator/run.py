"""Generate a run, send it to Kafka paced by simulated time, and write its ground truth beside it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from infra.settings import Settings
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import KINDS, Schedule, build_schedule, iter_messages
from streams.simulator.traffic import simulate_traffic
from streams.simulator.world import build_world

# A paced send may run a few milliseconds ahead of the clock; the broker accepts timestamps up to an hour ahead.
FUTURE_SLACK_MS = 60_000


@dataclass
class Generated:
    truth: pd.DataFrame
    schedule: Schedule
    campaigns: pd.DataFrame  # the catalog, published before the traffic


def generate(cfg: SimulatorConfig, settings: Settings, drain: bool = False) -> Generated:
    """The whole run, deterministic for ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    world = build_world(cfg, rng)
    truth = simulate_traffic(cfg, world, rng, settings.windows.click_window_s,
                             settings.windows.conversion_window_s, settings.windows.feedback_window_s)
    schedule = build_schedule(truth, cfg, settings, rng, drain=drain)
    return Generated(truth, schedule, world.campaigns(cfg.start_ms))


def send_catalog(campaigns: pd.DataFrame, settings: Settings) -> int:
    """Publish the campaign catalog (one ``Campaign`` record per campaign, stamped with its event time)."""
    from schemas.codec import encode
    from schemas.events import Campaign

    producer = make_producer(settings)
    try:
        for row in campaigns.to_dict("records"):
            key, value, headers = encode(Campaign(**row))
            producer.send(settings.topics.campaigns, key=key, value=value, headers=headers,
                          timestamp_ms=int(row["event_time_ms"]))
        producer.flush()
    finally:
        producer.close()
    return len(campaigns)


def make_producer(settings: Settings):
    """The simulator's producer (the ad server's event logger): idempotent, and retrying for up to five minutes,
    so that a broker restart neither drops nor repeats a record."""
    from kafka import KafkaProducer

    return KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=20,
                         batch_size=512 * 1024, max_request_size=4 * 1024 * 1024,
                         enable_idempotence=True, delivery_timeout_ms=300_000)


def send(schedule: Schedule, settings: Settings, speed: float, start_ms: int,
         log_every_s: float = 5.0, producer=None) -> dict[str, int]:
    """Send every delivery; with ``speed`` > 0, simulated time advances ``speed`` times wall-clock."""
    own = producer is None
    producer = producer or make_producer(settings)
    counts: dict[str, int] = {}
    wall0 = last_log = time.monotonic()
    sent = future = 0
    now_ms = int(time.time() * 1000)
    try:
        for topic, key, value, headers, when in iter_messages(schedule):
            if when > now_ms + FUTURE_SLACK_MS and when > (now_ms := int(time.time() * 1000)) + FUTURE_SLACK_MS:
                future += 1  # not delivered yet in the real world (and the broker refuses future timestamps)
                continue
            if speed > 0 and sent % 16 == 0:
                ahead = (when - start_ms) / 1000.0 / speed - (time.monotonic() - wall0)
                if ahead > 0:
                    time.sleep(ahead)
            # The record's timestamp is the simulated delivery time: what a real producer's clock would say.
            producer.send(topic, value=value, key=key, headers=headers, timestamp_ms=when)
            counts[topic] = counts.get(topic, 0) + 1
            sent += 1
            if sent % 4096 == 0 and time.monotonic() - last_log >= log_every_s:
                last_log = time.monotonic()
                sim_h = (when - start_ms) / 3_600_000
                print(f"simulator: {sent:,}/{len(schedule):,} sent, simulated {sim_h:.2f} h, "
                      f"{sent / (last_log - wall0):,.0f} events/s", flush=True)
        producer.flush()
        if future:
            print(f"simulator: {future:,} deliveries lie after the present (the simulated run is too recent for "
                  "them): not sent", flush=True)
    finally:
        if own:
            producer.close()
    return counts


def write_truth(gen: Generated, cfg: SimulatorConfig, settings: Settings, counts: dict[str, int]) -> Path:
    """truth.parquet (one row per impression), config.json and summary.json under var/runs/<run id>."""
    out = settings.runs_dir / cfg.prefix
    out.mkdir(parents=True, exist_ok=True)
    gen.truth.to_parquet(out / "truth.parquet", index=False)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    t = gen.truth
    summary = {
        "impressions": len(t), "clicks": int(t["clicked"].sum()), "conversions": int(t["converts"].sum()),
        "conversions_in_window": int(t["converted_in_window"].sum()),
        "negative_feedback": int(t["negative"].sum()) if "negative" in t else 0,
        "mean_true_pctr": float(t["true_pctr"].mean()),
        "sent": counts,
        "malformed": {c.NAME: int(t.get(f"{c.NAME}_malformed", pd.Series(dtype=bool)).sum()) for c in KINDS},
        "late": {c.NAME: int(t.get(f"{c.NAME}_late", pd.Series(dtype=bool)).sum()) for c in KINDS},
        "duplicated": {c.NAME: int(t.get(f"{c.NAME}_duplicated", pd.Series(dtype=bool)).sum()) for c in KINDS},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out
