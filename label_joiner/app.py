"""The always-on label joiner: ``faust -A label_joiner.app worker -l info``.

faust is the worker framework (the App, the ``worker`` command, signals, logging); the join runs on the
project's batched, exactly-once engine (``streams/engine.py``) as a service of the App. Key: impression
id; windows and lateness from the settings; state per input partition in RocksDB with a changelog topic;
outputs: training examples, matured labels and dead letters. ``ADS_LABEL_SCHEME`` = naive | fnw |
delay_curve picks the examples' labels; ``ADS_LABEL_JOINER_ID`` names the consumer group (default
``label-joiner``). Start N workers (processes) with the same id to share the partitions.
"""

from __future__ import annotations

import os

from infra.settings import get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.processor import STAGE, JoinProcessor
from label_joiner.schemes import make_scheme
from streams.engine import EngineConfig
from streams.faust_app import engine_app
from streams.service import EngineService

settings = get_settings()
GROUP = os.environ.get("ADS_LABEL_JOINER_ID", "label-joiner")
SCHEME = os.environ.get("ADS_LABEL_SCHEME", "naive")
T = settings.topics

app = engine_app(f"{GROUP}-worker", settings)
scheme = make_scheme(SCHEME, DelayCurve.load_latest(settings) if SCHEME == "delay_curve" else None,
                     settings.windows.elapsed_windows_s)
config = EngineConfig(group_id=GROUP, inputs=[T.impressions, T.clicks, T.conversions, T.negative_feedback],
                      dead_letter_topic=T.dead_letters, stage=STAGE, state_dir=settings.var_dir / "state",
                      idle_timeout_s=settings.windows.idle_timeout_s,
                      max_record_bytes=settings.kafka.max_record_bytes)
app.service(EngineService(settings, config, lambda p, store: JoinProcessor(settings, scheme, p, store)))
