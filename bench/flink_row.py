"""The joiner benchmark's Flink row: runs ``bench/flink_join.py`` in its own venv (``.venv-flink``, made by
``bench/flink/setup.sh``) from the project's venv.

``python -m bench.flink_row`` fills fresh topics with a simulated backlog, runs the job over it and prints
its throughput beside what the simulator's ground truth says the output should hold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from infra.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FLINK_PYTHON = ROOT / ".venv-flink" / "bin" / "python"
JAR_DIR = ROOT / "infra" / "flink" / "lib"
SCRIPT = ROOT / "bench" / "flink_join.py"


def connector_jar() -> Path | None:
    """The Kafka SQL connector jar gathered by setup.sh, if any."""
    jars = sorted(JAR_DIR.glob("flink-sql-connector-kafka-*.jar"))
    return jars[-1] if jars else None


def flink_available() -> bool:
    """Whether setup.sh has made .venv-flink and gathered the connector."""
    return FLINK_PYTHON.exists() and connector_jar() is not None


def flink_join(bootstrap: str, impressions: str, clicks: str, output: str, parallelism: int = 2,
               timeout_s: float = 600, validate: bool = True) -> dict[str, Any]:
    """Run the Flink job to its end; its result line (events_in, rows_out, seconds, startup_s, ...).

    ``validate=False`` checks only impression_id and event_time_ms, so Flink never decodes the other fields.
    Raises RuntimeError with the tail of the job's log when it fails or prints no result.
    """
    if not flink_available():
        raise RuntimeError(f"Flink is not installed ({FLINK_PYTHON}, {JAR_DIR}): run bench/flink/setup.sh")
    cmd = [str(FLINK_PYTHON), str(SCRIPT), "--bootstrap", bootstrap, "--impressions", impressions,
           "--clicks", clicks, "--output", output, "--parallelism", str(parallelism), "--jar", str(connector_jar())]
    cmd += [] if validate else ["--no-validate"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise RuntimeError(f"flink job timed out after {timeout_s:.0f}s:\n{log[-4000:]}") from e
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"flink job failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(lines[-1])


def expected(truth: pd.DataFrame) -> dict[str, int]:
    """What the ground truth says about the impressions and clicks delivered (malformed ones excluded)."""
    imp_ok = truth["impression_delivered"] & ~truth["impression_malformed"]
    click_ok = truth["click_delivered"] & ~truth["click_malformed"] & imp_ok
    copies = 1 + truth["impression_duplicated"].astype(int)
    click_copies = (1 + truth["click_duplicated"].astype(int)).where(click_ok, 0).clip(lower=1)
    return {"valid_impressions": int(imp_ok.sum()),
            "valid_impression_copies": int(copies[imp_ok].sum()),
            "valid_clicked": int(click_ok.sum()),
            "rows_if_every_copy_pair_joins": int((copies * click_copies)[imp_ok].sum()),
            "late_impressions": int((imp_ok & truth["impression_late"]).sum()),
            "late_clicks": int((click_ok & truth["click_late"]).sum())}


def observed(settings: Settings, topic: str) -> dict[str, int]:
    """Rows, distinct impressions and clicked impressions in the job's output topic."""
    from infra.topics import read_topic

    rows = [json.loads(r.value) for r in read_topic(settings, topic, timeout_s=300)]
    return {"rows": len(rows), "distinct_impressions": len({r["impression_id"] for r in rows}),
            "clicked_rows": sum(bool(r["clicked"]) for r in rows),
            "distinct_clicked": len({r["impression_id"] for r in rows if r["clicked"]})}


def main() -> int:
    """Fill fresh topics with a simulated backlog, run the Flink job on it, print a table."""
    from infra.settings import get_settings
    from infra.topics import topic_counts, with_topic_prefix
    from streams.simulator.config import SimulatorConfig
    from streams.simulator.run import generate, send

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hours", type=float, default=6.0, help="simulated hours (20k impressions/h)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--parallelism", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="jobs over the same backlog, each to a fresh output")
    p.add_argument("--no-validate", action="store_true", help="skip the schema checks (see flink_join)")
    a = p.parse_args()
    if not flink_available():
        print("flink: not installed: run bench/flink/setup.sh", file=sys.stderr)
        return 1
    settings = with_topic_prefix(get_settings(), f"flk{uuid.uuid4().hex[:6]}")
    t = settings.topics
    cfg = SimulatorConfig(hours=a.hours, speed=0, prediction_log=False, seed=a.seed)
    t0 = time.perf_counter()
    gen = generate(cfg, settings, drain=True)
    send(gen.schedule, settings, speed=0, start_ms=cfg.start_ms)
    counts = topic_counts(settings, [t.impressions, t.clicks])
    print(f"backlog: {counts} in {time.perf_counter() - t0:.1f}s", flush=True)
    want = expected(gen.truth)
    print("truth:", json.dumps(want), flush=True)
    print(f"\n{'run':>3} {'events_in':>10} {'rows_out':>9} {'seconds':>8} {'startup_s':>9} {'first_row_s':>11} "
          f"{'events/s':>9} {'ev/s after startup':>18}")
    results = []
    for run in range(a.runs):
        fresh = settings if run == 0 else with_topic_prefix(get_settings(), f"flk{uuid.uuid4().hex[:6]}")
        output = fresh.topics.training_examples  # an empty output topic per run
        r = flink_join(settings.kafka.bootstrap_servers, t.impressions, t.clicks, output, a.parallelism,
                       validate=not a.no_validate)
        results.append((output, r))
        steady = r["seconds"] - (r["startup_s"] or 0)
        print(f"{run:>3} {r['events_in']:>10,} {r['rows_out']:>9,} {r['seconds']:>8.2f} {r['startup_s'] or 0:>9.2f} "
              f"{r['first_row_s'] or 0:>11.2f} {r['events_in'] / r['seconds']:>9,.0f} "
              f"{r['events_in'] / steady:>18,.0f}", flush=True)
    print("output:", json.dumps(observed(settings, results[0][0])), flush=True)
    print("first result:", json.dumps(results[0][1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
