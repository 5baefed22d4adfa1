"""Start, find and stop the local service processes by pid file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def pid_of(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    try:  # a zombie (exited, not yet reaped) counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return None
    except (FileNotFoundError, IndexError):
        pass
    return pid


def start_detached(cmd: list[str], pidfile: Path, logfile: Path, env: dict | None = None) -> int:
    """Start ``cmd`` in its own session, output to ``logfile``, pid to ``pidfile``."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    pidfile.write_text(str(proc.pid))
    return proc.pid


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.25, alive=None) -> None:
    """Poll ``check()`` until true; fail loudly on timeout or when ``alive()`` says the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: process exited before it was ready")
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s")


def stop(pidfile: Path, name: str, timeout_s: float = 30.0) -> bool:
    """SIGTERM the process group, wait, then SIGKILL. True if something was stopped."""
    pid = pid_of(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and pid_of(pidfile) is not None:
            time.sleep(0.1)
        if pid_of(pidfile) is None:
            break
        print(f"{name}: still running after {sig.name}, escalating")
    pidfile.unlink(missing_ok=True)
    return True


def service_main(argv: list[str] | None, prog: str, doc: str | None, start, stop, status) -> int:
    """The ``up|down|status`` command line of a local service: ``start()``, ``stop()``, or print ``status()``
    (a list of lines)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    cmd = p.parse_args(argv).command
    if cmd == "status":
        print("\n".join(status()))
    else:
        (start if cmd == "up" else stop)()
    return 0
