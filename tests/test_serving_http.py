"""``python -m streams.serving`` as a process: POST /score, GET /health and /metrics, a bad body is a 422."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from streams.serving.app import metrics_path
from tests.test_scorer import T0, fill_store, register, request, serving_settings
from trainers.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen, port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if call(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not answer /health in time")


def test_service_scores_over_http(fresh_topics, tmp_path):
    settings = serving_settings(fresh_topics, tmp_path)
    fill_store(settings)
    version = register(Registry(settings.registry_dir), settings, seed=50)
    port = free_port()
    env = {**os.environ, **settings.to_env(), "ADS_SERVING__PORT": str(port), "ADS_ENV_FILE": "/nonexistent"}
    proc = subprocess.Popen([sys.executable, "-m", "streams.serving"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port)
        r = request("http-1", 1, list(range(0, 240, 3)), T0, slots=2)
        body = {k: list(v) if isinstance(v, list | tuple) else v for k, v in r.__dict__.items()}
        status, answer = call(port, "POST", "/score", body)
        assert status == 200, answer
        assert answer["model_version"] == version and answer["arm"] == "all"
        assert [s["position"] for s in answer["shown"]] == [0, 1]
        assert [s["impression_id"] for s in answer["shown"]] == ["http-1-0", "http-1-1"]
        assert all(0 < s["pctr"] < 1 and 0 <= s["price"] <= s["bid"] for s in answer["shown"])

        status, empty = call(port, "POST", "/score", {**body, "request_id": "http-2", "ad_ids": [],
                                                       "campaign_ids": [], "advertiser_ids": [], "category_ids": [],
                                                       "bids": []})
        assert status == 200 and empty["shown"] == []

        status, bad = call(port, "POST", "/score", {**body, "bids": body["bids"][:-1]})
        assert status == 422 and "bids has" in json.dumps(bad)
        status, bad = call(port, "POST", "/score", {**body, "user_id": "nobody"})
        assert status == 422 and "user_id" in json.dumps(bad)
        status, bad = call(port, "POST", "/score", {**body, "bids": [-1.0] * len(body["bids"])})
        assert status == 422 and "bids" in json.dumps(bad)

        status, health = call(port, "GET", "/health")
        assert status == 200 and health["model_version"] == health["promoted_version"] == version
        status, metrics = call(port, "GET", "/metrics")
        assert status == 200 and metrics["requests"] == 2 and metrics["shown"] == 2
        assert metrics["latency_ms"]["p99"] > 0 and "sent" in metrics["logger"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "serving: model" in out and "serving: stopped" in out
    written = json.loads(metrics_path(settings).read_text())  # written at stop (and every 10 s)
    assert written["requests"] == 2
