"""Freshness of the real-time features: from an impression's event time to its user's row being readable
in the online store (Feast's layout in Redis), p50/p99, at a steady live rate.

``python -m bench.realtime_freshness --rate 200 --seconds 30``: starts the real-time worker on fresh
topics, produces impressions stamped with the present (each for a user never seen before, so its row
appears exactly when that impression is in it), and polls Redis for each user's ``_ts:user_realtime``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

from feature_repo.online import entity_key
from infra.settings import get_settings
from infra.topics import with_topic_prefix
from label_joiner.worker import start_worker, stop_worker
from schemas.codec import encode
from schemas.events import Impression
from streams.simulator.run import make_producer


def impression(i: int, user: int, now_ms: int) -> Impression:
    return Impression(impression_id=f"fresh-i{i}", request_id=f"fresh-r{i}", user_id=user, ad_id=i % 500,
                      advertiser_id=i % 25, campaign_id=i % 100, placement="feed", position=0, device="mobile",
                      bid=1.0, event_time_ms=now_ms, model_version="bench", served_pctr=0.03, served_pcvr=0.02,
                      feature_ref=f"fresh-i{i}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.realtime_freshness", description=__doc__)
    p.add_argument("--rate", type=float, default=200.0, help="impressions per second")
    p.add_argument("--seconds", type=float, default=30.0)
    a = p.parse_args(argv)
    run = f"fresh{uuid.uuid4().hex[:6]}"
    base = get_settings()
    settings = with_topic_prefix(base, run).model_copy(update={"var_dir": base.var_dir / run, "feast_project": run})
    worker = start_worker(settings, run, settings.var_dir / "realtime.log", app_module="streams.realtime_app")

    r = settings.redis
    client = r.client()
    producer = make_producer(settings)
    def send(i: int, user: int) -> int:
        event_ms = int(time.time() * 1000)
        key, value, headers = encode(impression(i, user, event_ms))
        producer.send(settings.topics.impressions, key=key, value=value, headers=headers, timestamp_ms=event_ms)
        return event_ms

    def readable(users: list[int]) -> list[bool]:
        pipe = client.pipeline(transaction=False)
        for u in users:
            pipe.hexists(entity_key({"user_id": u}, settings.feast_project), "_ts:user_realtime")
        return pipe.execute()

    lat: list[float] = []
    pending: dict[int, int] = {}
    try:
        send(0, 1)  # warm up: the worker joins its groups and starts its transactional producers
        producer.flush()
        deadline = time.time() + 120
        while not readable([1])[0]:
            if time.time() > deadline:
                raise SystemExit(f"the worker wrote nothing in 120 s; see {settings.var_dir / 'realtime.log'}")
            time.sleep(0.1)
        total, sent, t0 = int(a.rate * a.seconds), 0, time.time()
        deadline = t0 + a.seconds + 60
        while (sent < total or pending) and time.time() < deadline:
            while sent < total and sent < (time.time() - t0) * a.rate:
                user = 10**9 + sent
                pending[user] = send(sent + 1, user)
                sent += 1
            producer.flush()
            users = list(pending)
            seen_ms = time.time() * 1000
            for u, present in zip(users, readable(users), strict=True):
                if present:
                    lat.append(seen_ms - pending.pop(u))
            time.sleep(0.01)
    finally:
        producer.close()
        stop_worker(worker)
    if not lat:
        print("no measurement: the worker never wrote a row; see", settings.var_dir / "realtime.log")
        return 1
    q = statistics.quantiles(lat, n=100)
    print(f"\nReal-time features: event time -> the user's row readable in Redis, {len(lat):,} impressions at "
          f"{a.rate:.0f}/s (polled every ~10 ms)\n")
    print("| p50 ms | p90 ms | p99 ms | max ms | not seen |\n|---|---|---|---|---|")
    print(f"| {q[49]:.0f} | {q[89]:.0f} | {q[98]:.0f} | {max(lat):.0f} | {len(pending)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
