"""``python -m streams.simulator --hours 24 --users 100000 --ads 20000 --seed 7``"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from infra.settings import Settings, get_settings
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate, send, send_catalog, write_truth


def parse(argv: list[str] | None) -> tuple[SimulatorConfig, bool, bool]:
    defaults = SimulatorConfig()
    p = argparse.ArgumentParser(prog="python -m streams.simulator",
                                description="Simulate ads traffic into Kafka, with its ground truth.")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--run-id", default=None, help="id prefix and output folder (default sim<seed>)")
    p.add_argument("--start", type=datetime.fromisoformat, default=defaults.start,
                   help="simulated start, ISO 8601 UTC (default: midnight 9 days ago; records are stamped with "
                        "their simulated delivery time, so the run must lie in the past)")
    p.add_argument("--hours", type=float, default=defaults.hours)
    p.add_argument("--users", type=int, default=defaults.users)
    p.add_argument("--ads", type=int, default=defaults.ads)
    p.add_argument("--impressions-per-hour", type=float, default=defaults.impressions_per_hour)
    p.add_argument("--ctr", type=float, default=defaults.ctr)
    p.add_argument("--cvr", type=float, default=defaults.cvr)
    p.add_argument("--speed", type=float, default=defaults.speed,
                   help="simulated seconds per wall-clock second (0: as fast as possible)")
    p.add_argument("--no-prediction-log", action="store_true")
    p.add_argument("--drain", action="store_true",
                   help="also deliver events after the end (every window closes)")
    p.add_argument("--batched", action="store_true",
                   help="send whole record batches (aiokafka's batch API): load tests above 100k events/s")
    a = p.parse_args(argv)
    cfg = SimulatorConfig(seed=a.seed, run_id=a.run_id, start=a.start, hours=a.hours, users=a.users,
                          ads=a.ads, impressions_per_hour=a.impressions_per_hour, ctr=a.ctr, cvr=a.cvr,
                          speed=a.speed, prediction_log=not a.no_prediction_log)
    return cfg, a.drain, a.batched


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    cfg, drain, batched = parse(argv)
    settings = settings or get_settings()
    t0 = time.monotonic()
    gen = generate(cfg, settings, drain=drain)
    print(f"simulator: {len(gen.truth):,} impressions, {len(gen.schedule):,} deliveries generated in "
          f"{time.monotonic() - t0:.1f}s; sending at speed {cfg.speed or 'max'}", flush=True)
    send_catalog(gen.campaigns, settings)
    if batched:
        from streams.simulator.batched import send_batched

        counts = send_batched(gen.schedule, settings, cfg.speed, cfg.start_ms)
    else:
        counts = send(gen.schedule, settings, cfg.speed, cfg.start_ms)
    out = write_truth(gen, cfg, settings, counts)
    print(f"simulator: sent {sum(counts.values()):,} events in {time.monotonic() - t0:.1f}s: {counts}")
    print(f"simulator: ground truth in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
