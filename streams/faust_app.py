"""The faust App every always-on worker of the project runs in.

faust gives the worker command (``faust -A <module> worker``), signals, logging and services; the stream
engine (``streams/engine.py``), started as a service of the App, does the Kafka I/O with its own clients.
So faust's own Kafka consumer and producer stay off: they would only run an idle consumer group in a
thread beside the engine.
"""

from __future__ import annotations

import faust
from faust.app import BootStrategy

from infra.settings import Settings


class EngineBoot(BootStrategy):
    """Boot without faust's own Kafka consumer and producer."""

    enable_kafka = False


class EngineApp(faust.App):
    """A faust App for workers that run the stream engine as a service."""

    BootStrategy = EngineBoot


def engine_app(app_id: str, settings: Settings) -> EngineApp:
    """An :class:`EngineApp` on the settings' brokers (with their SASL/TLS credentials)."""
    return EngineApp(app_id, broker=[f"kafka://{b}" for b in settings.kafka.bootstrap_servers.split(",")],
                     broker_credentials=settings.kafka.faust_credentials(), datadir=str(settings.var_dir / "faust"),
                     web_enabled=False)
