"""The always-on real-time feature worker: ``faust -A streams.realtime_app worker -l info``.

Two engine services in one worker (``streams.realtime_features``): the fan-out (impressions and clicks
-> entity events, group ``<id>-fanout``) and the entity features (entity events -> the online store and
the ``realtime_features`` log, group ``<id>-entities``). ``ADS_REALTIME_ID`` names the groups (default
``realtime``); start N workers with the same id to share the partitions.
"""

from __future__ import annotations

import os

from infra.settings import get_settings
from streams.engine import EngineConfig
from streams.faust_app import engine_app
from streams.realtime_features import FANOUT_STAGE, FEATURES_STAGE, EntityFeatures, FanOut
from streams.service import EngineService

settings = get_settings()
GROUP = os.environ.get("ADS_REALTIME_ID", "realtime")
T = settings.topics

app = engine_app(f"{GROUP}-worker", settings)
common = {"dead_letter_topic": T.dead_letters, "state_dir": settings.var_dir / "state",
          "idle_timeout_s": settings.windows.idle_timeout_s, "max_record_bytes": settings.kafka.max_record_bytes}
fanout = EngineConfig(group_id=f"{GROUP}-fanout", inputs=[T.impressions, T.clicks], stage=FANOUT_STAGE, **common)
entities = EngineConfig(group_id=f"{GROUP}-entities", inputs=[T.realtime_entity_events], stage=FEATURES_STAGE,
                        **common)
app.service(EngineService(settings, fanout, lambda p, store: FanOut(settings, p, store)))
app.service(EngineService(settings, entities, lambda p, store: EntityFeatures(settings, p, store)))
