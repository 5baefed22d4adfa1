"""Run ``bench/flink_join.py`` in its own venv (``make flink`` installs it) from the project's benchmark."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLINK_PYTHON = ROOT / ".venv-flink" / "bin" / "python"
JAR_DIR = ROOT / "infra" / "flink" / "lib"


def connector_jar() -> Path | None:
    jars = sorted(JAR_DIR.glob("flink-sql-connector-kafka-*.jar"))
    return jars[-1] if jars else None


def flink_available() -> bool:
    return FLINK_PYTHON.exists() and connector_jar() is not None


def flink_join(bootstrap: str, impressions: str, clicks: str, output: str, parallelism: int = 2,
               timeout_s: float = 900) -> dict:
    """The job's result line (``seconds``: submit to end); raises with the log's tail when it fails."""
    cmd = [str(FLINK_PYTHON), str(ROOT / "bench" / "flink_join.py"), "--bootstrap", bootstrap, "--impressions",
           impressions, "--clicks", clicks, "--output", output, "--jar", str(connector_jar()),
           "--parallelism", str(parallelism)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"flink job failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1])
