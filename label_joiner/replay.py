"""Run the join in-process over a simulator schedule (tests, evaluation and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from label_joiner.join import LabelJoiner, Outputs
from schemas.codec import InvalidEvent, decode
from schemas.events import Click, Conversion, Impression
from streams.simulator.delivery import Schedule, iter_messages


@dataclass
class ReplayResult:
    outputs: Outputs = field(default_factory=Outputs)
    undecodable: int = 0

    def matured_frame(self) -> pd.DataFrame:
        return pd.DataFrame([m.model_dump() for m in self.outputs.matured])

    def examples_frame(self) -> pd.DataFrame:
        return pd.DataFrame([e.model_dump() for e in self.outputs.examples])


def replay(joiner: LabelJoiner, schedule: Schedule, flush: bool = True) -> ReplayResult:
    """Feed every delivery, in delivery order, to ``joiner`` (one partition); optionally close all windows."""
    cls_of = {schedule.topics[c]: c for c in (Impression, Click, Conversion) if c in schedule.topics}
    handler = {Impression: joiner.on_impression, Click: joiner.on_click, Conversion: joiner.on_conversion}
    result = ReplayResult()
    for topic, _key, value, headers, _when in iter_messages(schedule):
        cls = cls_of.get(topic)
        if cls is None:
            continue
        try:
            event = decode(cls, value, headers)
        except InvalidEvent:
            result.undecodable += 1
            continue
        result.outputs.extend(handler[cls](event))
        result.outputs.extend(joiner.advance(0))
    if flush:
        result.outputs.extend(joiner.flush())
    return result
