"""Decode + validate cost per event: the pydantic codec vs the msgspec decoder derived from ``schemas/``.

``python -m bench.decode`` (``make bench-decode``): the same simulated payloads (malformed ones included),
one run, side by side.
"""

from __future__ import annotations

import time

from infra.settings import get_settings
from schemas.codec import InvalidEvent, decode
from schemas.fast import FastDecoder
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate


def main() -> None:
    gen = generate(SimulatorConfig(hours=2, speed=0, seed=9), get_settings(), drain=True)
    cls_of = {topic: cls for cls, topic in gen.schedule.topics.items()}
    msgs = [(cls_of[topic], value, headers) for topic, _k, value, headers, _w in iter_messages(gen.schedule)]
    fast = {cls: FastDecoder(cls) for cls in cls_of.values()}

    def pydantic_way(cls, value, headers):
        return decode(cls, value, headers).model_dump()

    def msgspec_way(cls, value, headers):
        return fast[cls].decode_dict(value, headers)

    rows = []
    for name, fn in (("pydantic codec (validate + dump)", pydantic_way), ("msgspec decoder (Struct + asdict)",
                                                                           msgspec_way)):
        t0 = time.perf_counter()
        for cls, value, headers in msgs:
            try:
                fn(cls, value, headers)
            except InvalidEvent:
                pass
        rows.append((name, 1e6 * (time.perf_counter() - t0) / len(msgs)))
    print(f"{len(msgs):,} events (impressions, clicks, conversions, prediction logs; malformed included)\n")
    print(f"{'decoder':<36} {'us/event':>9} {'x pydantic':>11}")
    for name, us in rows:
        print(f"{name:<36} {us:>9.2f} {rows[0][1] / us:>11.1f}")


if __name__ == "__main__":
    main()
