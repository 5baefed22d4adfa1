"""Delay-correction schemes: which training examples the joiner emits for an impression, and when.

Each example has a deterministic ``example_id`` (``<impression>/<kind>/<event id>``): a replay emits the
same ids, so a reader drops repeats by id, and the newest example of an impression (``is_correction``)
supersedes the earlier ones. ``as_of_ms`` is the event time the example describes, never a wall clock.

* ``naive``: a click is a negative for the conversion at once; a later conversion *replaces* it.
* ``fnw`` (fake-negative weighting, Ktena et al. 2019): every click is a negative at once and every
  conversion, whenever it arrives, an extra positive; the trainer weights positives by (1 + p) and
  negatives by (1 - p)(1 + p), p its own stop-gradient prediction.
* ``delay_curve`` (ES-DFM style elapsed window, then the delay curve): the click example waits
  ``elapsed_window_s`` of event time. A conversion inside that window makes it a positive; otherwise it
  carries the probability that the click still converts, p (1 - F(E)) / (1 - p F(E)), F the historical
  delay curve (of the click's segment when the curve has segments) at the elapsed window E. A later
  conversion replaces it with a positive.

Every scheme emits a negative when an impression's click window closes without a click.
"""

from __future__ import annotations

from typing import ClassVar

from label_joiner.delay_curve import DelayCurve
from schemas.events import TrainingExample

SCHEMA = TrainingExample.schema_id()


def example(base: dict, scheme: str, kind: str, *, clicked: bool, converted: bool, label_ctcvr: float,
            as_of_ms: int, weight: float = 1.0, delay_cdf: float | None = None,
            is_correction: bool = False) -> dict:
    """One training example as a dict shaped like :class:`schemas.events.TrainingExample`."""
    click_t = base["click_time_ms"] if clicked else None
    conv_t = base["conversion_time_ms"] if converted else None
    return {
        "example_id": f"{base['impression_id']}/{kind}", "impression_id": base["impression_id"],
        "user_id": base["user_id"], "ad_id": base["ad_id"], "advertiser_id": base["advertiser_id"],
        "campaign_id": base["campaign_id"], "placement": base["placement"], "position": base["position"],
        "device": base["device"], "model_version": base["model_version"],
        "impression_time_ms": base["impression_time_ms"], "clicked": clicked, "converted": converted,
        "scheme": scheme, "label_ctr": float(clicked), "label_ctcvr": label_ctcvr, "weight": weight,
        "as_of_ms": as_of_ms, "click_time_ms": click_t, "conversion_time_ms": conv_t,
        "elapsed_since_click_s": None if click_t is None else max(0.0, (as_of_ms - click_t) / 1000.0),
        "delay_cdf": delay_cdf, "is_correction": is_correction,
    }


class LabelScheme:
    """Base (``naive``): a click example at once, a conversion example that replaces it."""

    name: ClassVar[str] = "naive"
    conversion_replaces: ClassVar[bool] = True

    def on_change(self, entry: dict, base: dict, click: dict | None, conv: dict | None, now_ms: int,
                  examples: list[dict]) -> None:
        """The entry's attributed click or conversion may have changed: emit what is new."""
        sent = entry["sent"]
        if click is not None and sent.get("click") != click["id"]:
            correction = "click" in sent
            sent.pop("conv", None)
            sent["click"] = click["id"]
            examples.append(example(base, self.name, f"click/{click['id']}", clicked=True, converted=False,
                                    label_ctcvr=0.0, as_of_ms=click["t"], is_correction=correction))
        if conv is not None and sent.get("conv") != conv["id"]:
            sent["conv"] = conv["id"]
            examples.append(example(base, self.name, f"conversion/{conv['id']}", clicked=True, converted=True,
                                    label_ctcvr=1.0, as_of_ms=conv["t"], is_correction=self.conversion_replaces))

    def pending_until(self, entry: dict, click: dict) -> int | None:
        """Event time of an emission the scheme is waiting for (None: nothing pending)."""
        return None

    def on_close(self, entry: dict, base: dict, click: dict | None, conv: dict | None, click_deadline_ms: int,
                 examples: list[dict]) -> None:
        """The impression's last window closed."""
        if click is None and not entry["sent"].get("noclick"):
            entry["sent"]["noclick"] = True
            examples.append(example(base, self.name, "noclick", clicked=False, converted=False, label_ctcvr=0.0,
                                    as_of_ms=click_deadline_ms))


class NaiveScheme(LabelScheme):
    name = "naive"


class FakeNegativeScheme(LabelScheme):
    name = "fnw"
    conversion_replaces = False


class DelayCurveScheme(LabelScheme):
    name = "delay_curve"

    def __init__(self, curve: DelayCurve, elapsed_window_s: float = 3600.0):
        self.curve = curve
        self.elapsed_ms = int(elapsed_window_s * 1000)

    def pending_until(self, entry: dict, click: dict) -> int | None:
        return None if entry["sent"].get("click") == click["id"] else click["t"] + self.elapsed_ms

    def on_change(self, entry: dict, base: dict, click: dict | None, conv: dict | None, now_ms: int,
                  examples: list[dict]) -> None:
        sent = entry["sent"]
        if click is None:
            return
        window_end = click["t"] + self.elapsed_ms
        if sent.get("click") != click["id"]:
            if now_ms < window_end:
                return  # still inside the elapsed window
            correction = "click" in sent
            sent["click"] = click["id"]
            if conv is not None and conv["t"] <= window_end:
                sent["conv"] = conv["id"]
                examples.append(example(base, self.name, f"elapsed/{click['id']}", clicked=True, converted=True,
                                        label_ctcvr=1.0, as_of_ms=window_end, delay_cdf=None,
                                        is_correction=correction))
                return
            sent.pop("conv", None)
            segment = base.get(self.curve.segment_field) if self.curve.segment_field else None
            e_s = self.elapsed_ms / 1000.0
            examples.append(example(base, self.name, f"elapsed/{click['id']}", clicked=True, converted=False,
                                    label_ctcvr=self.curve.eventual_conversion(e_s, segment=segment),
                                    as_of_ms=window_end, delay_cdf=self.curve.cdf(e_s, segment),
                                    is_correction=correction))
        if conv is not None and sent.get("conv") != conv["id"]:
            sent["conv"] = conv["id"]
            examples.append(example(base, self.name, f"conversion/{conv['id']}", clicked=True, converted=True,
                                    label_ctcvr=1.0, as_of_ms=max(conv["t"], window_end), is_correction=True))


def make_scheme(name: str, curve: DelayCurve | None = None, elapsed_window_s: float = 3600.0) -> LabelScheme:
    if name == "naive":
        return NaiveScheme()
    if name == "fnw":
        return FakeNegativeScheme()
    if name == "delay_curve":
        if curve is None:
            raise ValueError("scheme delay_curve needs a published delay curve: "
                             "run `python -m label_joiner.delay_curve`")
        return DelayCurveScheme(curve, elapsed_window_s)
    raise ValueError(f"unknown label scheme {name!r}: choose naive, fnw or delay_curve")
