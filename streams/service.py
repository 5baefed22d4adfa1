"""Run a stream :class:`streams.engine.Engine` as a service of a faust App (started and stopped with the
worker), with a progress line every 10 seconds."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from mode import Service

from infra.settings import Settings
from streams.engine import Engine, EngineConfig, Processor
from streams.state import Store

log = logging.getLogger(__name__)


def tune_gc() -> tuple[int, int, int]:
    """The engine allocates many short-lived containers per event: move what start-up built out of the
    collector's reach and let it run less often (each pass walks every tracked object). Returns the thresholds
    before. (On the joiner at Python's defaults the collector took ~15 % of the in-process time per event.)"""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    return before


class EngineService(Service):
    def __init__(self, settings: Settings, config: EngineConfig,
                 make_processor: Callable[[int, Store], Processor], report_every_s: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.engine = Engine(settings, config, make_processor)
        self.report_every_s = report_every_s

    async def on_start(self) -> None:
        tune_gc()
        await self.engine.start()

    async def on_stop(self) -> None:
        await self.engine.stop()

    @Service.task
    async def _run(self) -> None:
        try:
            await self.engine.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.critical("%s: the engine failed; stopping the worker", self.engine.config.stage, exc_info=True)
            self._crash_worker()

    @Service.task
    async def _report(self) -> None:
        while not self.should_stop:
            await self.sleep(self.report_every_s)
            counts = {}
            for task in list(self.engine.tasks.values()):
                for k, v in task.processor.counts.items():
                    counts[k] = counts.get(k, 0) + v
            log.info("%s: %s; %s %s", self.engine.config.stage, self.engine.report(), dict(self.engine.counts),
                     counts)

    def _crash_worker(self) -> None:
        import os

        logging.shutdown()
        os._exit(70)
