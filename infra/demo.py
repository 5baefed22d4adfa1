"""The main job, end to end on the local stack: ``python -m infra.demo --hours 3``.

Creates this demo's own topics (``demo<time>-impressions``, ...), starts the label joiner worker on them,
simulates the last ``--hours`` of traffic into Kafka (paced: a simulated day in two minutes), waits until
the joiner has caught up, prints what landed in each topic, and stops the worker.

Each demo has topics of its own because the simulator stamps every record with its simulated delivery
time: a second demo on the same topics would send records older than the joiner's clock.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta

from infra.settings import get_settings
from infra.topics import group_lag, topic_counts, with_topic_prefix
from label_joiner.worker import start_worker, stop_worker
from streams.simulator.__main__ import main as simulate


def wait_until_caught_up(settings, group: str, timeout_s: float = 300.0) -> None:
    """Wait until the joiner has committed every input event (windows still open close later, in real time:
    the last impressions' click windows end ten minutes after they happened)."""
    t = settings.topics
    outputs = [t.training_examples, t.matured_labels, t.dead_letters]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, total = group_lag(settings, group, [t.impressions, t.clicks, t.conversions])
        print(f"demo: joiner committed {done:,} of {total:,} input events; outputs {topic_counts(settings, outputs)}",
              flush=True)
        if total and done >= total:
            return
        time.sleep(3)
    print("demo: the joiner did not catch up in time; see its log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.demo", description=__doc__)
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--speed", type=float, default=720.0)
    a = p.parse_args(argv)
    run_id = f"demo{int(time.time())}"
    settings = with_topic_prefix(get_settings(), run_id)
    log = settings.var_dir / f"{run_id}-label_joiner.log"
    group = f"label-joiner-{run_id}"
    worker = start_worker(settings, group, log)
    print(f"demo: label joiner started (pid {worker.pid}, log {log}), topics {run_id}-*", flush=True)
    try:
        # The simulated hours end now: every record's timestamp (its simulated delivery) lies in the past.
        start = (datetime.now(UTC) - timedelta(hours=a.hours)).replace(second=0, microsecond=0).isoformat()
        simulate(["--hours", str(a.hours), "--speed", str(a.speed), "--start", start, "--run-id", run_id],
                 settings)
        wait_until_caught_up(settings, group)
    finally:
        stop_worker(worker)
    print(f"\nWhat landed in each topic of this demo ({run_id}-*; transaction markers count as messages):")
    for name, count in topic_counts(settings).items():
        print(f"  {name:<34} {count:>10,} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
