"""A processor's event-time clock (its watermark) over several inputs, as Flink builds one.

Each input's newest arrival time (the Kafka record timestamp) is tracked. The clock is the minimum over the
*active* inputs of their newest arrival minus a bounded out-of-orderness (Flink's
``forBoundedOutOfOrderness``; Kafka Streams' grace): a record up to that bound behind the newest of its input
is still ahead of the clock. An input the runtime reports idle (read to its end and quiet) drops out of the
minimum, so a quiet input never stalls the others. When every input is idle the clock **holds** (Flink's
default); with ``idle_advance_rate`` > 0 it advances from the last data seen by the processing time elapsed
since that data arrived, times the rate (1.0: real time), so the last windows close in production. It never
jumps to the wall clock, and it never moves backwards.

Records behind the clock are beyond the bound: the processor makes them dead letters with
:meth:`EventClock.behind_reason`. Within the bound, what a processor emits does not depend on batching,
pauses, restarts or replay.

>>> c = EventClock(("impression", "click"), out_of_orderness_ms=1_000)
>>> c.observe("impression", 10_000); c.observe("click", 8_000)
>>> c.advance(idle=set(), wall_ms=0)  # the slower input holds the clock back, minus the bound
7000
>>> c.advance(idle={"click"}, wall_ms=0)  # an idle input drops out
9000
>>> c.advance(idle={"impression", "click"}, wall_ms=60_000)  # every input idle: the clock holds
9000
>>> c.behind_reason(8_500)
'behind the clock: record time 8500 is 500 ms behind the event-time clock 9000 (out-of-orderness bound 1000 ms)'
"""

from __future__ import annotations

from collections.abc import Iterable


class EventClock:
    """The clock of one task; :meth:`state` / :meth:`from_state` save and restore it with the task's state."""

    def __init__(self, inputs: Iterable[str], out_of_orderness_ms: int = 0, idle_advance_rate: float = 0.0,
                 newest: dict[str, int] | None = None, time_ms: int = 0):
        self.inputs = tuple(inputs)
        self.out_of_orderness_ms = int(out_of_orderness_ms)
        self.idle_advance_rate = float(idle_advance_rate)
        self.newest: dict[str, int] = {s: int((newest or {}).get(s, 0)) for s in self.inputs}
        self.time_ms = int(time_ms)
        self._last_data: tuple[int, int] | None = None  # (newest arrival, wall ms when it was first seen)

    def observe(self, source: str, arrival: int) -> None:
        """A record of ``source`` arrived at ``arrival`` (ms)."""
        if arrival > self.newest[source]:
            self.newest[source] = arrival

    def behind(self, arrival: int) -> bool:
        return arrival < self.time_ms

    def behind_reason(self, arrival: int) -> str:
        return (f"behind the clock: record time {arrival} is {self.time_ms - arrival} ms behind the event-time clock "
                f"{self.time_ms} (out-of-orderness bound {self.out_of_orderness_ms} ms)")

    def advance(self, idle: set[str], wall_ms: int) -> int:
        """Move the clock after a batch (``idle``: the inputs read to their end and quiet); return it."""
        top = max(self.newest.values(), default=0)
        if self._last_data is None or top != self._last_data[0]:
            self._last_data = (top, wall_ms)
        active = [self.newest[s] for s in self.inputs if s not in idle]
        if active:
            candidate = min(active) - self.out_of_orderness_ms
        elif self.idle_advance_rate > 0:
            since = max(0, wall_ms - self._last_data[1])
            candidate = top - self.out_of_orderness_ms + int(since * self.idle_advance_rate)
        else:
            candidate = self.time_ms
        self.time_ms = max(self.time_ms, candidate)
        return self.time_ms

    def advance_to(self, time_ms: int) -> int:
        """Move the clock to ``time_ms`` if that is ahead (a replay of one merged, ordered stream)."""
        self.time_ms = max(self.time_ms, int(time_ms))
        return self.time_ms

    def state(self) -> dict:
        return {**self.newest, "clock": self.time_ms}

    @classmethod
    def from_state(cls, saved: dict | None, inputs: Iterable[str], out_of_orderness_ms: int = 0,
                   idle_advance_rate: float = 0.0) -> EventClock:
        saved = saved or {}
        return cls(inputs, out_of_orderness_ms, idle_advance_rate, newest=saved, time_ms=saved.get("clock", 0))
