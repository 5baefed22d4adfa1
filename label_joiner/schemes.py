"""Delay-correction schemes: what training examples the joiner emits, and with which labels and weights.

All schemes emit a click example as soon as the click is joined (without waiting for the conversion
window), a conversion example when the conversion arrives, and a non-click example when the click
window closes. They differ in what the click example says about the conversion it cannot see yet:

* ``naive``: the unconverted click is a negative; a later conversion *replaces* it (``is_correction``).
* ``fnw`` (fake-negative weighting, Ktena et al. 2019): the same stream, but the conversion arrives as an
  extra positive duplicate; the trainer weights positives by (1 + p) and negatives by (1 - p)(1 + p), p
  its own stop-gradient prediction.
* ``delay_curve`` (importance weighting by the historical delay curve F): an unconverted click at
  elapsed time e carries the soft label p (1 - F(e)) / (1 - p F(e)), the probability that it converts
  eventually, and ``delay_cdf`` = F(e); a later conversion replaces it with label 1. With a segmented
  curve, F and p are those of the click's segment (e.g. its advertiser).
"""

from __future__ import annotations

import time
from typing import ClassVar

from label_joiner.delay_curve import DelayCurve
from schemas.events import TrainingExample


def example(base: dict, scheme: str, *, clicked: bool, converted: bool, label_ctcvr: float, now_ms: int,
            weight: float = 1.0, delay_cdf: float | None = None, is_correction: bool = False) -> TrainingExample:
    click_t = base["click_time_ms"]
    elapsed = max(0.0, (now_ms - click_t) / 1000.0) if click_t is not None else None  # in event time
    return TrainingExample(
        **base, clicked=clicked, converted=converted, scheme=scheme, label_ctr=float(clicked),
        label_ctcvr=label_ctcvr, weight=weight, emitted_at_ms=int(time.time() * 1000),
        elapsed_since_click_s=elapsed, delay_cdf=delay_cdf, is_correction=is_correction)


class LabelScheme:
    """Base: the emissions every scheme shares. Subclasses change the click example."""

    name: ClassVar[str] = "naive"
    correction_replaces: ClassVar[bool] = True

    def on_click(self, base: dict, now_ms: int) -> list[TrainingExample]:
        return [example(base, self.name, clicked=True, converted=False, label_ctcvr=0.0,
                        now_ms=now_ms)]

    def on_conversion(self, base: dict, now_ms: int) -> list[TrainingExample]:
        return [example(base, self.name, clicked=True, converted=True, label_ctcvr=1.0,
                        now_ms=now_ms, is_correction=self.correction_replaces)]

    def on_click_window_closed(self, base: dict, now_ms: int) -> list[TrainingExample]:
        return [example(base, self.name, clicked=False, converted=False, label_ctcvr=0.0,
                        now_ms=now_ms)]


class NaiveScheme(LabelScheme):
    name = "naive"


class FakeNegativeScheme(LabelScheme):
    name = "fnw"
    correction_replaces = False


class DelayCurveScheme(LabelScheme):
    name = "delay_curve"

    def __init__(self, curve: DelayCurve):
        self.curve = curve

    def on_click(self, base: dict, now_ms: int) -> list[TrainingExample]:
        elapsed_s = max(0.0, (now_ms - base["click_time_ms"]) / 1000.0)
        segment = base.get(self.curve.segment_field) if self.curve.segment_field else None
        f = self.curve.cdf(elapsed_s, segment)
        return [example(base, self.name, clicked=True, converted=False, now_ms=now_ms,
                        label_ctcvr=self.curve.eventual_conversion(elapsed_s, segment=segment), delay_cdf=f)]


def make_scheme(name: str, curve: DelayCurve | None = None) -> LabelScheme:
    if name == "naive":
        return NaiveScheme()
    if name == "fnw":
        return FakeNegativeScheme()
    if name == "delay_curve":
        if curve is None:
            raise ValueError("scheme delay_curve needs a published delay curve: "
                             "run `python -m label_joiner.delay_curve`")
        return DelayCurveScheme(curve)
    raise ValueError(f"unknown label scheme {name!r}: choose naive, fnw or delay_curve")
