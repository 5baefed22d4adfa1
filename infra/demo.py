"""The main job, end to end on the local stack: ``python -m infra.demo --hours 3``.

Starts the label joiner worker, simulates traffic into Kafka (paced: a simulated day in two minutes),
waits until the joiner has caught up, prints what landed in each topic, and stops the worker.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from infra.settings import get_settings
from infra.topics import ensure_topics, topic_counts
from label_joiner.worker import start_worker, stop_worker
from streams.simulator.__main__ import main as simulate


def wait_until_settled(settings, quiet_s: float = 15.0, timeout_s: float = 300.0) -> None:
    """Wait until the joiner's outputs stop growing for ``quiet_s`` (it has caught up)."""
    outputs = [settings.topics.training_examples, settings.topics.matured_labels, settings.topics.dead_letters]
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = topic_counts(settings, outputs)
        if counts != last:
            print(f"demo: joiner outputs so far {counts}", flush=True)
            last, since = counts, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(3)
    print("demo: the joiner did not settle in time; see var/label_joiner.log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__)
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--speed", type=float, default=720.0)
    a = p.parse_args(argv)
    settings = get_settings()
    ensure_topics(settings)
    log = settings.var_dir / "label_joiner.log"
    worker = start_worker(settings, "label-joiner", log)
    print(f"demo: label joiner started (pid {worker.pid}, log {log})", flush=True)
    try:
        # Simulated time starts now, so that repeated demos move event time forward on the same topics.
        start = datetime.now(UTC).replace(second=0, microsecond=0).isoformat()
        simulate(["--hours", str(a.hours), "--speed", str(a.speed), "--start", start,
                  "--run-id", f"demo-{int(time.time())}"])
        wait_until_settled(settings)
    finally:
        stop_worker(worker)
    print("\nWhat landed in each topic (all runs so far):")
    for name, count in topic_counts(settings).items():
        print(f"  {name:<20} {count:>10,} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
