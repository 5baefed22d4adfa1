"""``make up`` is idempotent and ``make down`` leaves no process behind (the stack is restarted after)."""

from __future__ import annotations

import subprocess
import sys

import psutil

from infra.kafka_broker import KafkaBroker
from infra.process import port_open
from infra.redis_server import RedisServer
from infra.settings import get_settings


def stack(command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "infra.stack", command], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alive(pid: int) -> bool:
    """True for a running process (an exited one that its parent has not reaped yet does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listeners(ports: set[int]) -> list[int]:
    """Pids of live processes listening on any of ``ports``."""
    return [c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in ports and (c.pid is None or alive(c.pid))]


def test_up_is_idempotent_and_down_leaves_nothing():
    s = get_settings()
    kafka, redis_ = KafkaBroker(s), RedisServer(s)
    stack("up")
    pids = (kafka.pid(), redis_.pid())
    assert None not in pids
    out = stack("up")
    assert "already running" in out and "topics: all present" in out
    assert (kafka.pid(), redis_.pid()) == pids
    try:
        stack("down")
        assert kafka.pid() is None and redis_.pid() is None
        assert not any(alive(p) for p in pids)
        assert listeners({kafka.port, s.kafka.controller_port, s.redis.port}) == []
        assert not port_open(kafka.host, kafka.port) and not port_open(s.redis.host, s.redis.port)
        assert "not running" in stack("down")
    finally:
        stack("up")
    assert kafka.ready() and redis_.ready()
