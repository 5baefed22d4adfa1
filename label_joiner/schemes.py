"""Delay-correction schemes: which training examples the joiner emits for an impression, and when.

Each example has a deterministic ``example_id`` (``<impression>/<kind>/<event id>``): a replay emits the
same ids, so a reader drops repeats by id, and the newest example of an impression (``is_correction``)
supersedes the earlier ones. ``as_of_ms`` is the event time the example describes, never a wall clock.

* ``naive``: a click is a negative for the conversion at once; a later conversion *replaces* it.
* ``fnw`` (fake-negative weighting, Ktena et al. 2019): every click is a negative at once and every
  conversion, whenever it arrives, an extra positive; the trainer weights a click's fake negative by
  (1 - p), p its own stop-gradient pCVR (``trainers/loss.py`` says why not Ktena's (1 + p) factor under ESMM).
* ``delay_curve`` (an elapsed window, then soft labels from the fitted delay curve and a *segment prior*
  ``p``; this is not ES-DFM, which samples elapsed times and weights by the model's own prediction and
  the delay distribution): the click example waits the first
  elapsed window (``elapsed_windows_s[0]``, 1 h by default) of event time. A conversion inside it makes
  the example a positive; otherwise it carries the probability that the click still converts,
  p (1 - F(E)) / (1 - p F(E)), F the historical delay curve (of the click's segment when the curve has
  segments) at the elapsed time E. At each later checkpoint (6 h, 1 d, 3 d by default) an unconverted
  click gets a correction with the lower probability at that age; a conversion replaces it with a positive.

Every scheme emits a negative when an impression's click window closes without a click; that example carries the
negative-feedback label (``label_neg``), decided by then. Click examples are emitted at the click, before it is
known, and carry none (the online tower learns P(feedback | no click); the batch cadences learn it on every
impression from the matured labels).
"""

from __future__ import annotations

from typing import ClassVar

from label_joiner.delay_curve import DelayCurve
from schemas.events import TrainingExample

SCHEMA = TrainingExample.schema_id()


def example(base: dict, scheme: str, kind: str, *, clicked: bool, converted: bool, label_ctcvr: float,
            as_of_ms: int, weight: float = 1.0, delay_cdf: float | None = None,
            is_correction: bool = False, label_neg: float | None = None) -> dict:
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
        "delay_cdf": delay_cdf, "is_correction": is_correction, "label_neg": label_neg,
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
                                    as_of_ms=click_deadline_ms, label_neg=float(base["negative_feedback"])))


class NaiveScheme(LabelScheme):
    name = "naive"


class FakeNegativeScheme(LabelScheme):
    name = "fnw"
    conversion_replaces = False


class DelayCurveScheme(LabelScheme):
    name = "delay_curve"

    def __init__(self, curve: DelayCurve, elapsed_windows_s: list[float] | tuple[float, ...] = (3600.0,)):
        self.curve = curve
        self.checkpoints_ms = sorted(int(e * 1000) for e in elapsed_windows_s)

    def pending_until(self, entry: dict, click: dict) -> int | None:
        """The next decision time: the next checkpoint, or the record time of a known conversion (from then on,
        everything that arrived before it has been read)."""
        sent = entry["sent"]
        first_end = click["t"] + self.checkpoints_ms[0]
        if sent.get("click") != click["id"]:
            return first_end
        if "conv" in sent:
            return None  # a positive was emitted: nothing more to say
        k = sent["k"]
        due = click["t"] + self.checkpoints_ms[k] if k < len(self.checkpoints_ms) else None
        if sent.get("ca") is not None:
            positive = max(sent["ca"], first_end)
            due = positive if due is None else min(due, positive)
        return due

    def on_change(self, entry: dict, base: dict, click: dict | None, conv: dict | None, now_ms: int,
                  examples: list[dict]) -> None:
        """Decided by record times, emitted once the clock has passed them: checkpoint ``k`` (the click's time
        plus ``elapsed_windows_s[k]``) is a soft label unless the conversion's record time is at or before it;
        the positive is emitted once the clock has passed the conversion's record time (and the first window).
        So the examples do not depend on how far the clock moved at once, nor on the order records were read in
        within the out-of-orderness bound."""
        if click is None:
            return
        sent = entry["sent"]
        if sent.get("click") != click["id"]:  # a new attributed click: start over at the first checkpoint
            replaced = "click" in sent
            sent.clear()
            sent.update(click=click["id"], k=0, replaced=replaced)
        if "conv" in sent:
            return  # a positive was emitted already
        sent["ca"] = None if conv is None else conv["a"]
        first_end = click["t"] + self.checkpoints_ms[0]
        segment = base.get(self.curve.segment_field) if self.curve.segment_field else None
        while True:
            k = sent["k"]
            checkpoint = click["t"] + self.checkpoints_ms[k] if k < len(self.checkpoints_ms) else None
            if conv is not None and (checkpoint is None or conv["a"] <= checkpoint):
                if now_ms > max(conv["a"], first_end):
                    self._positive(base, sent, click, conv, first_end, examples)
                return
            if checkpoint is None or now_ms <= checkpoint:
                return
            e_ms = self.checkpoints_ms[k]
            examples.append(example(base, self.name, f"elapsed{k}/{click['id']}", clicked=True, converted=False,
                                    label_ctcvr=self.curve.eventual_conversion(e_ms / 1000, segment=segment),
                                    as_of_ms=checkpoint, delay_cdf=self.curve.cdf(e_ms / 1000, segment),
                                    is_correction=k > 0 or sent["replaced"]))
            sent["k"] = k + 1

    def _positive(self, base: dict, sent: dict, click: dict, conv: dict, first_end: int,
                  examples: list[dict]) -> None:
        sent["conv"] = conv["id"]
        if sent["k"] == 0 and conv["t"] <= first_end:  # converted within the first window, known at its end
            sent["k"] = 1
            examples.append(example(base, self.name, f"elapsed0/{click['id']}", clicked=True, converted=True,
                                    label_ctcvr=1.0, as_of_ms=first_end, is_correction=sent["replaced"]))
        else:
            examples.append(example(base, self.name, f"conversion/{conv['id']}", clicked=True, converted=True,
                                    label_ctcvr=1.0, as_of_ms=max(conv["t"], first_end), is_correction=True))


def make_scheme(name: str, curve: DelayCurve | None = None,
                elapsed_windows_s: list[float] | tuple[float, ...] = (3600.0,)) -> LabelScheme:
    if name == "naive":
        return NaiveScheme()
    if name == "fnw":
        return FakeNegativeScheme()
    if name == "delay_curve":
        if curve is None:
            raise ValueError("scheme delay_curve needs a published delay curve: "
                             "run `python -m label_joiner.delay_curve`")
        return DelayCurveScheme(curve, elapsed_windows_s)
    raise ValueError(f"unknown label scheme {name!r}: choose naive, fnw or delay_curve")
