"""A faust agent that only counts its input: the most any faust stream agent can do on this machine.

``faust -A bench.faust_ceiling worker`` (started by ``bench/joiner.py``) reads the three input topics with
the label joiner's own App settings and the same ``take_events`` batches, and does nothing else; faust
acknowledges and commits each batch as it does the joiner's. The gap between this row and the joiner's is
the join; the gap between this row and a bare aiokafka loop is faust's per-message delivery.
"""

from __future__ import annotations

import os

from infra.settings import get_settings
from streams.faust_app import faust_app

settings = get_settings()
T = settings.topics
app = faust_app(os.environ.get("ADS_LABEL_JOINER_ID", "faust-ceiling"), settings)
inputs = app.topic(T.impressions, T.clicks, T.conversions, key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")


@app.agent(inputs)
async def count(stream):
    async for _batch in stream.take_events(2000, within=0.03):
        pass  # nothing else: faust acks the batch when the body leaves it
