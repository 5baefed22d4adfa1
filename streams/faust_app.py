"""The faust App every worker of the project runs in, configured from the settings.

One place for the consumer, producer and group settings, so that the label joiner and any other faust
worker (and the benchmark's bare faust agent) behave alike.
"""

from __future__ import annotations

import logging

import faust
from faust.app import BootStrategy

from infra.settings import Settings

# faust logs every sent message at debug level; building those records costs more than most agents' work.
logging.getLogger("faust.topics").setLevel(logging.INFO)


def faust_app(app_id: str, settings: Settings) -> faust.App:
    """A faust App (consumer group ``app_id``) on the settings' brokers, with in-memory tables."""
    return faust.App(
        app_id,
        broker=[f"kafka://{b}" for b in settings.kafka.bootstrap_servers.split(",")],
        broker_credentials=settings.kafka.faust_credentials(),
        store="memory://",
        datadir=str(settings.var_dir / "faust"),
        topic_partitions=settings.kafka.default_partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        web_enabled=False,
        producer_acks=-1,
        producer_linger=0.01,
        producer_max_batch_size=256 * 1024,
        broker_max_poll_records=2000,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        # A crashed worker's partitions move to a live one after this long.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        # No standby copies of other workers' partitions in this worker's tables: an agent that indexes
        # and advances every entry it holds must hold only the partitions it owns.
        table_standby_replicas=0,
        key_serializer="json",
        value_serializer="json",
    )


class EngineBoot(BootStrategy):
    """Boot without faust's own Kafka consumer and producer: an engine worker brings its own clients
    (``streams/engine.py``), so faust would only run an idle consumer group in a thread beside it."""

    enable_kafka = False


class EngineApp(faust.App):
    """A faust App for workers that run the stream engine as a service: faust gives the worker command,
    signals, logging and services; the engine does the Kafka I/O."""

    BootStrategy = EngineBoot


def engine_app(app_id: str, settings: Settings) -> EngineApp:
    """An :class:`EngineApp` configured like :func:`faust_app`."""
    return EngineApp(app_id, broker=[f"kafka://{b}" for b in settings.kafka.bootstrap_servers.split(",")],
                     broker_credentials=settings.kafka.faust_credentials(), datadir=str(settings.var_dir / "faust"),
                     web_enabled=False)
