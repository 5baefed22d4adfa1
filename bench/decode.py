"""Decode + validate cost per event: the pydantic codec vs the msgspec decoder derived from ``schemas/``.

``python -m bench.decode`` (``make bench-decode``): the same simulated payloads (impressions, clicks,
conversions, prediction logs; malformed ones included), one run, side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from infra.settings import get_settings
from schemas.codec import InvalidEvent, decode
from schemas.fast import FastDecoder, to_dict
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate


def timed(fn: Callable, msgs: list) -> tuple[float, int]:
    """Microseconds per message and the number rejected."""
    rejected = 0
    t0 = time.perf_counter()
    for cls, value, headers in msgs:
        try:
            fn(cls, value, headers)
        except InvalidEvent:
            rejected += 1
    return 1e6 * (time.perf_counter() - t0) / len(msgs), rejected


def main() -> None:
    cfg = SimulatorConfig(hours=2, speed=0, seed=9, malformed_share=0.01, start=datetime(2026, 11, 1, tzinfo=UTC))
    gen = generate(cfg, get_settings(), drain=True)
    cls_of = {topic: cls for cls, topic in gen.schedule.topics.items()}
    msgs = [(cls_of[topic], value, headers) for topic, _k, value, headers, _w in iter_messages(gen.schedule)]
    fast = {cls: FastDecoder(cls) for cls in cls_of.values()}
    ways = {
        "loop only (no decode, in every row)": lambda cls, v, h: None,
        "pydantic codec -> model": lambda cls, v, h: decode(cls, v, h),
        "pydantic codec -> dict (model_dump)": lambda cls, v, h: decode(cls, v, h).model_dump(),
        "msgspec decoder -> Struct": lambda cls, v, h: fast[cls].decode(v, h),
        "msgspec decoder -> dict (to_dict)": lambda cls, v, h: to_dict(fast[cls].decode(v, h)),
    }
    rows = [(name, *timed(fn, msgs)) for name, fn in ways.items()]
    base = {"model": rows[1][1], "dict": rows[2][1]}
    print(f"{len(msgs):,} events, {rows[1][2]:,} malformed; one run\n")
    print(f"| {'decoder':<36} | {'us/event':>8} | {'x pydantic':>10} | {'rejected':>8} |")
    print(f"|{'-' * 38}|{'-' * 9}:|{'-' * 11}:|{'-' * 9}:|")
    print(f"| {rows[0][0]:<36} | {rows[0][1]:>8.2f} | {'':>10} | {'':>8} |")
    for name, us, rejected in rows[1:]:
        ref = base["dict" if "dict" in name else "model"]
        print(f"| {name:<36} | {us:>8.2f} | {ref / us:>10.1f} | {rejected:>8,} |")


if __name__ == "__main__":
    main()
