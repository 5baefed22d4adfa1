"""Start the faust worker as a child process with given settings (tests, benchmarks, the demo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from infra.settings import Settings


def worker_command(app_module: str = "label_joiner.app") -> list[str]:
    faust = Path(sys.executable).with_name("faust")
    return [str(faust), "-A", app_module, "worker", "-l", "info", "--without-web"]


def start_worker(settings: Settings, app_id: str, log_path: Path, scheme: str = "naive",
                 app_module: str = "label_joiner.app") -> subprocess.Popen:
    """A worker in its own process group, logging to ``log_path``; stop it with :func:`stop_worker`."""
    env = {**os.environ, **settings.to_env(), "ADS_LABEL_JOINER_ID": app_id, "ADS_REALTIME_ID": app_id,
           "ADS_LABEL_SCHEME": scheme}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(worker_command(app_module), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_worker(proc: subprocess.Popen, kill: bool = False, timeout_s: float = 60) -> None:
    """SIGTERM (a clean stop: faust flushes and commits) or SIGKILL (a crash), then reap."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
