"""``python -m streams.serving``: the scoring service on ``serving.host:serving.port`` (uvicorn, one worker).

Waits for a promoted model in the registry (a status line every 10 s), starts the scorer (online read path,
prediction logger, model reloads), then serves until SIGINT/SIGTERM, printing a status line every 10 s:
requests, latency p50/p99, the model served and the prediction logger's counters.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from infra.settings import get_settings
from streams.serving.app import create_app, metrics_path
from streams.serving.scorer import Scorer
from trainers.registry import Registry


def status_line(m: dict) -> str:
    lat = m.get("latency_ms") or {}
    lg = m.get("logger") or {}
    return (f"serving: {m['requests']:,} requests, {m['shown']:,} shown "
            f"(p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms), model {m['model_version']} "
            f"({m['reloads']} reloads); prediction log sent {lg.get('sent', 0):,}, spooled {lg.get('spooled', 0):,}, "
            f"dropped {lg.get('dropped', 0):,}, kafka {'up' if lg.get('kafka_up') else 'down'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streams.serving", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="default: settings.serving.host")
    p.add_argument("--port", type=int, help="default: settings.serving.port")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the scorer's)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("streams.serving").setLevel(logging.INFO)
    settings = get_settings()
    host, port = a.host or settings.serving.host, a.port or settings.serving.port
    registry = Registry(settings.registry_dir)
    waited = 0.0
    while registry.promoted() is None:
        if waited % 10 == 0:
            print(f"serving: waiting for a promoted model in {registry.root}", flush=True)
        time.sleep(1.0)
        waited += 1.0
    print(f"serving: loading the promoted model {registry.promoted()} and the read path "
          f"(Redis {settings.redis.host}:{settings.redis.port}, project {settings.feast_project})", flush=True)
    scorer = Scorer(settings, registry, device=a.device, threads=a.threads).start()
    print(f"serving: model {scorer.model_version} on http://{host}:{port} (POST /score, GET /health, GET /metrics); "
          f"metrics every 10 s to {metrics_path(settings)}", flush=True)
    app = create_app(settings, scorer, on_metrics=lambda m: print(status_line(m), flush=True))

    import uvicorn

    # uvicorn shuts down gracefully on SIGINT/SIGTERM (the app closes the scorer and flushes the prediction log),
    # then raises the signal again: with these handlers that ends here instead of killing the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, workers=1, log_level="warning", access_log=False)
    print("serving: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
