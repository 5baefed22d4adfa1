"""The scoring service: a small FastAPI app over :class:`~streams.serving.scorer.Scorer`.

- ``POST /score``: a JSON body mirroring :class:`~streams.serving.scorer.AdRequest`; answers the shown ads
  (slot order) with their scores and prices, the arm and the model version. A malformed body is a 422 that
  says which field is wrong; an empty candidate list gets an empty answer.
- ``GET /health``: the model version served, the promoted one in the registry, the read path's staleness.
- ``GET /metrics``: ``Scorer.metrics()`` (requests, latency p50/p99, versions served, reloads, the logger's counters).

Every ``METRICS_EVERY_S`` the metrics are also written to ``<var_dir>/serving/metrics.json`` (write, then rename)
for ``make monitor``. ``python -m streams.serving`` runs it (see ``__main__.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import FastAPI, Response
from pydantic import BaseModel, Field, model_validator

from infra.settings import Settings
from streams.serving.scorer import AdRequest, Scorer

log = logging.getLogger(__name__)

METRICS_EVERY_S = 10.0
Id = Annotated[int, Field(ge=0)]
Bid = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class ScoreBody(BaseModel):
    """The body of ``POST /score``: one request and its candidates (parallel lists, one entry per ad)."""

    request_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    placement: str = Field(min_length=1)
    device: str = Field(min_length=1)
    event_time_ms: int = Field(ge=0)
    slots: int = Field(default=1, ge=0, le=100)
    ad_ids: list[Id] = Field(default_factory=list)
    campaign_ids: list[Id] = Field(default_factory=list)
    advertiser_ids: list[Id] = Field(default_factory=list)
    category_ids: list[Annotated[int, Field(ge=-1)]] = Field(default_factory=list, description="-1: unknown")
    bids: list[Bid] = Field(default_factory=list, description="per conversion")

    @model_validator(mode="after")
    def same_lengths(self) -> ScoreBody:
        n = len(self.ad_ids)
        for name in ("campaign_ids", "advertiser_ids", "category_ids", "bids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {n} ad_ids")
        return self

    def to_request(self) -> AdRequest:
        return AdRequest(**self.model_dump())


def metrics_path(settings: Settings) -> Path:
    return settings.var_dir / "serving" / "metrics.json"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, path)


class MetricsWriter:
    """Writes the scorer's metrics to a JSON file every ``every_s`` (and once at stop); ``on_write`` sees each."""

    def __init__(self, scorer: Scorer, path: Path, every_s: float = METRICS_EVERY_S,
                 on_write: Callable[[dict], None] | None = None) -> None:
        self.scorer, self.path, self.every_s, self.on_write = scorer, path, every_s, on_write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-metrics", daemon=True)

    def start(self) -> MetricsWriter:
        self._thread.start()
        return self

    def write(self) -> dict:
        metrics = {**self.scorer.metrics(), "written_at_ms": int(time.time() * 1000)}
        write_json_atomic(self.path, metrics)
        if self.on_write is not None:
            self.on_write(metrics)
        return metrics

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write()
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("serving: cannot write metrics to %s", self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.write()
        except Exception:  # noqa: BLE001
            log.exception("serving: cannot write metrics to %s", self.path)


def _json(data: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def create_app(settings: Settings, scorer: Scorer | None = None,
               on_metrics: Callable[[dict], None] | None = None) -> FastAPI:
    """The service. Without a ``scorer``, one is made from ``settings`` and started when the app starts; the app
    closes its scorer when it stops either way."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = scorer or Scorer(settings).start()
        app.state.scorer = s
        writer = MetricsWriter(s, metrics_path(settings), on_write=on_metrics).start()
        try:
            yield
        finally:
            writer.stop()
            s.close()

    app = FastAPI(title="adsstream scoring", lifespan=lifespan)

    @app.post("/score")
    def score(body: ScoreBody) -> Response:
        """The ads to show, in slot order, with their scores and second prices (per conversion)."""
        served = app.state.scorer.serve(body.to_request())
        return _json({"request_id": body.request_id, "arm": served.arm, "model_version": served.model.version,
                      "shown": [s.to_dict() for s in served.shown]})

    @app.get("/health")
    def health() -> Response:
        s: Scorer = app.state.scorer
        try:
            promoted = s.registry.promoted()
        except Exception as err:  # noqa: BLE001 - health reports it
            promoted = f"unreadable: {err}"
        refreshed = getattr(s.reader, "refreshed_at", 0.0)
        return _json({"status": "ok" if s.model_version else "no model", "model_version": s.model_version,
                      "promoted_version": promoted, "pinned_versions": s.pinned_versions,
                      "reader_staleness_s": s.reader.staleness_s,
                      "reader_refreshed_s_ago": round(time.monotonic() - refreshed, 3) if refreshed else None},
                     200 if s.model_version else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return _json(app.state.scorer.metrics())

    return app
