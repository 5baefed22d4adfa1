"""The attribution join as plain state transitions, independent of the stream runtime.

Key: impression id. Windows (event time): click within ``click_window_s`` after the impression,
conversion within ``conversion_window_s`` after the click. State: one small dict per open impression
(``state[impression_id]``), any MutableMapping: a dict in tests, a faust Table in the worker.
Output: training examples (at click, at conversion, at click-window close), matured labels (when the
last window closes) and rejected events with their reason (late, orphan, outside the window).

Watermark: ``max event time seen - allowed lateness``. An event older than the watermark is late; an
entry is finished once the watermark passes its expiry, so state stays bounded by the traffic of one
click window plus the clicked impressions of one conversion window.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from infra.settings import WindowSettings
from label_joiner.schemes import LabelScheme
from schemas.events import Click, Conversion, Event, Impression, MaturedLabel, TrainingExample

IMPRESSION_FIELDS = ("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "placement", "position",
                     "device", "model_version", "event_time_ms")


@dataclass
class Rejected:
    """An event the join could not use, and why (it becomes a dead letter)."""

    event: Event
    reason: str


@dataclass
class Outputs:
    examples: list[TrainingExample] = field(default_factory=list)
    matured: list[MaturedLabel] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def extend(self, other: Outputs) -> None:
        self.examples += other.examples
        self.matured += other.matured
        self.rejected += other.rejected


class LabelJoiner:
    """Stateful impression -> click -> conversion join with watermarks.

    >>> from infra.settings import WindowSettings
    >>> from label_joiner.schemes import NaiveScheme
    >>> j = LabelJoiner(WindowSettings(allowed_lateness_s=0), NaiveScheme(), state={})
    >>> imp = Impression(impression_id="i", request_id="r", user_id=1, ad_id=2, advertiser_id=3,
    ...     campaign_id=4, placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=0,
    ...     model_version="m", served_pctr=0.1, served_pcvr=0.1, feature_ref="i")
    >>> _ = j.on_impression(imp)
    >>> click = Click(click_id="c", impression_id="i", user_id=1, ad_id=2, event_time_ms=2000)
    >>> j.on_click(click).examples[0].clicked
    True
    >>> [m.clicked for m in j.advance(event_time_ms=10**12).matured]
    [True]
    """

    def __init__(self, windows: WindowSettings, scheme: LabelScheme, state: MutableMapping[str, dict]):
        self.click_ms = int(windows.click_window_s * 1000)
        self.conv_ms = int(windows.conversion_window_s * 1000)
        self.lateness_ms = int(windows.allowed_lateness_s * 1000)
        self.scheme = scheme
        self.state = state
        self.max_event_ms = 0
        self.counts: Counter[str] = Counter()
        # Per partition: heap of (expiry, impression id), rebuilt from the state on first use. Entries are
        # finished only while processing an event of their own partition, so a faust table writes each
        # change to the changelog partition that holds the key.
        self._due: dict[int, list[tuple[int, str]]] = {}
        self._indexed = False

    # -- watermark and expiry ---------------------------------------------------------------------------
    @property
    def watermark_ms(self) -> int:
        return self.max_event_ms - self.lateness_ms

    def _observe(self, t: int) -> None:
        self.max_event_ms = max(self.max_event_ms, t)

    def _expiry(self, entry: dict) -> int:
        imp = entry.get("imp")
        if imp is None:  # only held clicks / conversions: orphans once their impression would be late
            return min(h["event_time_ms"] for h in entry["held"])
        if entry.get("click") is not None:
            return entry["click"]["t"] + self.conv_ms
        return imp["event_time_ms"] + self.click_ms

    def _index(self, key: str, entry: dict) -> None:
        heapq.heappush(self._due.setdefault(entry["p"], []), (self._expiry(entry), key))

    def _late(self, t: int) -> bool:
        return t < self.watermark_ms

    # -- events -----------------------------------------------------------------------------------------
    def _entry(self, key: str, partition: int) -> dict:
        return self.state.get(key) or {"imp": None, "click": None, "conv": None, "held": [], "p": partition}

    def on_impression(self, imp: Impression, partition: int = 0) -> Outputs:
        out = Outputs()
        if self._late(imp.event_time_ms):
            return self._reject(out, imp, "late event: impression older than the watermark")
        self._observe(imp.event_time_ms)
        entry = self._entry(imp.impression_id, partition)
        if entry["imp"] is not None:
            self.counts["duplicate impression"] += 1
            return out
        entry["imp"] = {f: getattr(imp, f) for f in IMPRESSION_FIELDS}
        held, entry["held"] = entry["held"], []
        for h in sorted(held, key=lambda h: h["event_time_ms"]):
            cls = Click if h["kind"] == "click" else Conversion
            event = cls.model_validate({k: v for k, v in h.items() if k != "kind"})
            self._apply(entry, event, out)
        self._store(imp.impression_id, entry)
        return out

    def on_click(self, click: Click, partition: int = 0) -> Outputs:
        return self._on_outcome(click, partition)

    def on_conversion(self, conv: Conversion, partition: int = 0) -> Outputs:
        return self._on_outcome(conv, partition)

    def _on_outcome(self, event: Click | Conversion, partition: int) -> Outputs:
        out = Outputs()
        if self._late(event.event_time_ms):
            return self._reject(out, event, f"late event: {event.NAME} older than the watermark")
        self._observe(event.event_time_ms)
        entry = self._entry(event.impression_id, partition)
        if entry["imp"] is None or (isinstance(event, Conversion) and entry["click"] is None):
            held = {"kind": event.NAME, **event.model_dump()}
            if held in entry["held"]:
                self.counts[f"duplicate {event.NAME}"] += 1
            else:
                entry["held"].append(held)
                self.counts[f"held {event.NAME}"] += 1
        else:
            self._apply(entry, event, out)
        self._store(event.impression_id, entry)
        return out

    def _apply(self, entry: dict, event: Click | Conversion, out: Outputs) -> None:
        imp = entry["imp"]
        if isinstance(event, Click):
            if entry["click"] is not None:
                same = entry["click"]["id"] == event.click_id
                self.counts["duplicate click" if same else "repeat click"] += 1
                return
            delay = event.event_time_ms - imp["event_time_ms"]
            if not 0 <= delay <= self.click_ms:
                self._reject(out, event, f"outside click window: {delay / 1000:.1f}s after the impression")
                return
            entry["click"] = {"id": event.click_id, "t": event.event_time_ms}
            out.examples.extend(self.scheme.on_click(self._base(entry), self.watermark_ms))
            # A conversion held while the click was missing can be joined now.
            held, entry["held"] = entry["held"], []
            for h in held:
                self._apply(entry, Conversion.model_validate({k: v for k, v in h.items() if k != "kind"}), out)
            return
        if entry["conv"] is not None:
            self.counts["duplicate conversion" if entry["conv"]["id"] == event.conversion_id
                        else "repeat conversion"] += 1
            return
        if event.click_id != entry["click"]["id"]:
            self._reject(out, event, "conversion names another click than the attributed one")
            return
        delay = event.event_time_ms - entry["click"]["t"]
        if not 0 <= delay <= self.conv_ms:
            self._reject(out, event, f"outside conversion window: {delay / 3_600_000:.1f}h after the click")
            return
        entry["conv"] = {"id": event.conversion_id, "t": event.event_time_ms, "value": event.value}
        out.examples.extend(self.scheme.on_conversion(self._base(entry), self.watermark_ms))

    # -- time passing -----------------------------------------------------------------------------------
    def advance(self, partition: int = 0, event_time_ms: int | None = None) -> Outputs:
        """Move the watermark (optionally to ``event_time_ms``) and finish the entries of ``partition``
        that it passed."""
        if event_time_ms is not None:
            self._observe(event_time_ms)
        if not self._indexed:
            self._due = {}
            for k, e in self.state.items():
                self._due.setdefault(e["p"], []).append((self._expiry(e), k))
            for heap in self._due.values():
                heapq.heapify(heap)
            self._indexed = True
        out, wm = Outputs(), self.watermark_ms
        due = self._due.setdefault(partition, [])
        while due and due[0][0] < wm:
            expiry, key = heapq.heappop(due)
            entry = self.state.get(key)
            if entry is None:
                continue
            now_expiry = self._expiry(entry)
            if now_expiry != expiry:  # the entry moved on (a click arrived): re-index it
                if now_expiry >= wm:
                    heapq.heappush(due, (now_expiry, key))
                    continue
            self._finish(key, entry, out)
        # Time-driven examples (e.g. a scheme that waits an elapsed window after the click).
        out.examples.extend(self.scheme.on_watermark(wm))
        return out

    def _finish(self, key: str, entry: dict, out: Outputs) -> None:
        del self.state[key]
        if entry["imp"] is None:
            for h in entry["held"]:
                cls = Click if h["kind"] == "click" else Conversion
                self._reject(out, cls.model_validate({k: v for k, v in h.items() if k != "kind"}),
                             f"orphan {h['kind']}: no open impression (never arrived, or its window had closed)")
            return
        for h in entry["held"]:  # a conversion whose click never arrived
            self._reject(out, Conversion.model_validate({k: v for k, v in h.items() if k != "kind"}),
                         "orphan conversion: its click never arrived")
        base = self._base(entry)
        if entry["click"] is None:
            out.examples.extend(self.scheme.on_click_window_closed(base, self.watermark_ms))
        out.matured.append(MaturedLabel(
            impression_id=key, user_id=base["user_id"], ad_id=base["ad_id"], advertiser_id=base["advertiser_id"],
            campaign_id=base["campaign_id"], impression_time_ms=base["impression_time_ms"],
            clicked=entry["click"] is not None, converted=entry["conv"] is not None,
            click_time_ms=base["click_time_ms"], conversion_time_ms=base["conversion_time_ms"],
            conversion_value=entry["conv"]["value"] if entry["conv"] else 0.0))
        self.counts["matured"] += 1

    # -- helpers ----------------------------------------------------------------------------------------
    def _store(self, key: str, entry: dict) -> None:
        self.state[key] = entry
        if self._indexed:
            self._index(key, entry)

    def _reject(self, out: Outputs, event: Event, reason: str) -> Outputs:
        out.rejected.append(Rejected(event, reason))
        self.counts[reason.split(":", 1)[0]] += 1
        return out

    @staticmethod
    def _base(entry: dict) -> dict:
        """The fields every output about this impression shares."""
        imp = entry["imp"]
        base = {f: imp[f] for f in IMPRESSION_FIELDS if f != "event_time_ms"}
        base.update(impression_time_ms=imp["event_time_ms"],
                    click_time_ms=entry["click"]["t"] if entry["click"] else None,
                    conversion_time_ms=entry["conv"]["t"] if entry["conv"] else None)
        return base
