"""Run the join in-process over a simulator schedule (tests, evaluation, reports): no broker.

Each delivery's simulated time is its arrival (what the simulator stamps on the Kafka record), so an
in-process replay and the worker reading the same run from Kafka make the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from label_joiner.join import Emitted, PartitionJoin
from schemas.codec import InvalidEvent, decode
from schemas.events import Click, Conversion, Impression, NegativeFeedback
from streams.simulator.delivery import Schedule, iter_messages
from streams.state import MemoryStore

SOURCE = {Impression: "impression", Click: "click", Conversion: "conversion", NegativeFeedback: "feedback"}


@dataclass
class ReplayResult:
    outputs: Emitted = field(default_factory=Emitted)
    undecodable: int = 0

    def matured_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.outputs.matured)

    def examples_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.outputs.examples)


def replay(join: PartitionJoin, schedule: Schedule, flush: bool = True, advance_every: int = 1) -> ReplayResult:
    """Feed every delivery, in delivery order, to ``join`` (one partition holding everything), moving
    its clock every ``advance_every`` events; with ``flush``, close every window at the end."""
    return replay_each([join], schedule, flush, advance_every)[0]


def replay_each(joins: list[PartitionJoin], schedule: Schedule, flush: bool = True,
                advance_every: int = 1) -> list[ReplayResult]:
    """``replay`` into several joins at once (e.g. one per label scheme), decoding each delivery once; each join
    gets its own copy of the event and its own result, exactly as if replayed alone."""
    cls_of = {schedule.topics[c]: c for c in SOURCE if c in schedule.topics}
    results = [ReplayResult() for _ in joins]
    for n, (topic, _key, value, headers, when) in enumerate(iter_messages(schedule)):
        cls = cls_of.get(topic)
        if cls is None:
            continue
        try:
            event = decode(cls, value, headers)
        except InvalidEvent:
            for result in results:
                result.undecodable += 1
            continue
        for join, result in zip(joins, results, strict=True):
            join.on_event(SOURCE[cls], event.model_dump(), arrival=when, offset=n, out=result.outputs)
            if n % advance_every == 0:
                # One merged input in arrival order: nothing waits behind what was read, so its arrival is the clock.
                join.advance_to(when, result.outputs)
            join.store.commit()
    if flush:
        for join, result in zip(joins, results, strict=True):
            join.finish_all(result.outputs)
            join.store.commit()
    return results


def new_join(rules, scheme) -> PartitionJoin:
    """A join on an in-memory store."""
    return PartitionJoin(rules, scheme, MemoryStore())
