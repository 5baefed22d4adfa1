"""The attribution join of one input partition, as plain state transitions (no Kafka, no event loop).

Key: impression id (impressions, clicks and conversions are co-partitioned by it, so one partition holds
every event of an impression). Windows, in event time (``label_joiner.rules``): a click within the click
window after its impression, a conversion within the conversion window after its click; among several,
the earliest (event time, then id) counts. Lateness, in arrival time (the Kafka record timestamp): an
impression or click is joined when it arrives within the allowed lateness of its click window's end, a
conversion within the conversion lateness of its conversion window's end; later ones are dead letters.

State: one record per open impression in a :class:`streams.state.Store`, due (``"d"``) when its next
window closes. Clock: a :class:`streams.event_clock.EventClock` over the three inputs' arrival times (the
slowest active input's newest arrival minus the out-of-orderness bound; an idle input drops out; when
every input is idle the clock holds, or advances from the last data at ``idle_advance_rate``; never the
wall clock). A record is finished once the clock passes its due time, so a quiet input (conversions,
typically) never stalls labelling. An event whose arrival is behind the clock is beyond the bound: a dead
letter with its reason (it could belong to an impression already finished).

Output (``Emitted``): training examples (per the scheme, each with a deterministic id), matured labels
(when the last window closes) and dead letters for events that cannot be joined, with their reason.
Nothing in an output depends on the wall clock or on batch boundaries: a replay gives the same records.

>>> from infra.settings import WindowSettings
>>> from label_joiner.schemes import NaiveScheme
>>> from streams.state import MemoryStore
>>> j = PartitionJoin(Rules.from_settings(WindowSettings()), NaiveScheme(), MemoryStore())
>>> imp = {"impression_id": "i", "user_id": 1, "ad_id": 2, "advertiser_id": 3, "campaign_id": 4,
...        "placement": "feed", "position": 0, "device": "mobile", "model_version": "m", "event_time_ms": 0}
>>> out = Emitted()
>>> j.on_event("impression", imp, arrival=100, offset=0, out=out)
>>> j.on_event("click", {"click_id": "c", "impression_id": "i", "event_time_ms": 2000}, 2100, 0, out)
>>> [(e["example_id"], e["clicked"]) for e in out.examples]
[('i/click/c', True)]
>>> j.advance(idle={"conversion"}, wall_ms=0, out=out); j.finish_all(out)
>>> [(m["impression_id"], m["clicked"], m["converted"]) for m in out.matured]
[('i', True, False)]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from label_joiner.rules import Rules
from label_joiner.schemes import LabelScheme
from streams.event_clock import EventClock

SOURCES = ("impression", "click", "conversion")
IMPRESSION_FIELDS = ("user_id", "ad_id", "advertiser_id", "campaign_id", "placement", "position", "device",
                     "model_version")
CLOCK_KEY = "\x00meta/clock"
_END = 2**62


@dataclass
class Rejected:
    """An input event the join cannot use: it becomes a dead letter with this reason."""

    source: str
    event: dict
    arrival: int
    offset: int
    reason: str


@dataclass
class Emitted:
    """What a step produced: plain dicts shaped like ``schemas.events`` records."""

    examples: list[dict] = field(default_factory=list)
    matured: list[dict] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples) + len(self.matured) + len(self.rejected)


class PartitionJoin:
    """Impression -> click -> conversion join of one partition, on a :class:`streams.state.Store`."""

    def __init__(self, rules: Rules, scheme: LabelScheme, store, out_of_orderness_ms: int = 0,
                 idle_advance_rate: float = 0.0, clock_save_step_ms: int = 60_000):
        self.rules = rules
        self.scheme = scheme
        self.store = store
        self.counts: Counter[str] = Counter()
        saved = store.get(CLOCK_KEY) or {}
        self.clock = EventClock.from_state(saved, SOURCES, out_of_orderness_ms, idle_advance_rate)
        self.clock_save_step_ms = clock_save_step_ms
        self._saved = self.clock.state()

    @property
    def clock_ms(self) -> int:
        return self.clock.time_ms

    # -- events -------------------------------------------------------------------------------------------
    def on_event(self, source: str, event: dict, arrival: int, offset: int, out: Emitted) -> None:
        """Join one decoded event (a dict of its fields) that arrived at ``arrival`` (record time, ms)."""
        t = event["event_time_ms"]
        problem = self.rules.event_time_problem(t, arrival)
        if problem is not None:  # moves no clock: as if it had never come
            self._reject(out, source, event, arrival, offset,
                         f"{problem}: event time {t} vs record time {arrival} ({(t - arrival) / 1000:+.0f} s)")
            return
        if self.clock.behind(arrival):  # beyond the out-of-orderness bound: its impression may be finished
            self._reject(out, source, event, arrival, offset, self.clock.behind_reason(arrival))
            return
        self.clock.observe(source, arrival)
        key = event["impression_id"]
        entry = self.store.get(key)
        if source == "impression":
            self._on_impression(key, entry, event, arrival, offset, out)
        elif source == "click":
            self._on_click(key, entry, event, arrival, offset, out)
        else:
            self._on_conversion(key, entry, event, arrival, offset, out)

    def _on_impression(self, key: str, entry: dict | None, ev: dict, arrival: int, offset: int,
                       out: Emitted) -> None:
        if entry is not None and entry["imp"] is not None:
            self.counts["duplicate impression"] += 1
            return
        t = ev["event_time_ms"]
        if not self.rules.impression_arrived_in_time(t, arrival):
            self._reject(out, "impression", ev, arrival, offset,
                         f"late event: impression arrived {(arrival - t) / 1000:.0f} s after it happened")
            return
        if entry is None:
            entry = _new_entry()
        entry["imp"] = {"t": t, **{f: ev[f] for f in IMPRESSION_FIELDS}}
        held, entry["held"] = entry["held"], []
        for h in sorted(held, key=lambda h: (h["t"], h["src"] == "conversion")):
            if h["src"] == "click":
                self._add_click(key, entry, h, out)
            else:
                entry["convs"].append(h)
        self._update(key, entry, out)

    def _on_click(self, key: str, entry: dict | None, ev: dict, arrival: int, offset: int, out: Emitted) -> None:
        c = {"src": "click", "id": ev["click_id"], "t": ev["event_time_ms"], "a": arrival, "o": offset, "ev": ev}
        if entry is None:
            entry = _new_entry()
        if _has_id(entry, c["id"]):
            self.counts["duplicate click"] += 1
            return
        if entry["imp"] is None:
            entry["held"].append(c)
            self.counts["held click"] += 1
        elif not self._add_click(key, entry, c, out):
            return
        self._update(key, entry, out)

    def _add_click(self, key: str, entry: dict, c: dict, out: Emitted) -> bool:
        imp_t = entry["imp"]["t"]
        if not self.rules.click_in_window(imp_t, c["t"]):
            self._reject_held(out, c, f"outside click window: {(c['t'] - imp_t) / 1000:.1f}s after the impression")
            return False
        if not self.rules.click_arrived_in_time(imp_t, c["a"]):
            self._reject_held(out, c, "late event: click arrived after its click window closed")
            return False
        if entry["clicks"]:
            self.counts["repeat click"] += 1
        entry["clicks"].append({"id": c["id"], "t": c["t"], "a": c["a"]})
        return True

    def _on_conversion(self, key: str, entry: dict | None, ev: dict, arrival: int, offset: int,
                       out: Emitted) -> None:
        v = {"src": "conversion", "id": ev["conversion_id"], "t": ev["event_time_ms"], "a": arrival, "o": offset,
             "click": ev["click_id"], "value": ev["value"], "ev": ev}
        if entry is None:
            entry = _new_entry()
        if _has_id(entry, v["id"]):
            self.counts["duplicate conversion"] += 1
            return
        if entry["imp"] is None:
            entry["held"].append(v)
            self.counts["held conversion"] += 1
        else:
            entry["convs"].append(v)
        self._update(key, entry, out)

    # -- the entry's labels ----------------------------------------------------------------------------------
    def _click_of(self, entry: dict) -> dict | None:
        """The attributed click: the earliest valid one (time, then id)."""
        clicks = entry["clicks"]
        if not clicks:
            return None
        return min(clicks, key=lambda c: (c["t"], c["id"])) if len(clicks) > 1 else clicks[0]

    def _conversion_of(self, entry: dict, click: dict | None) -> dict | None:
        """The attributed conversion: the earliest that names the attributed click, happened in its window
        and arrived before the window (plus the conversions' lateness) closed."""
        if click is None:
            return None
        found = [v for v in entry["convs"] if v["click"] == click["id"]
                 and self.rules.conversion_in_window(click["t"], v["t"])
                 and self.rules.conversion_arrived_in_time(click["t"], v["a"])]
        return min(found, key=lambda v: (v["t"], v["id"])) if found else None

    def _update(self, key: str, entry: dict, out: Emitted) -> None:
        """Emit what changed (per the scheme), set the next due time, store."""
        if entry["imp"] is not None and entry["clicks"]:  # schemes emit nothing before a click
            click = self._click_of(entry)
            conv = self._conversion_of(entry, click)
            self.scheme.on_change(entry, self._base(key, entry, click, conv), click, conv, self.clock_ms,
                                  out.examples)
        entry["d"] = self._due(entry)
        self.store.put(key, entry)

    def _due(self, entry: dict) -> int:
        r = self.rules
        if entry["imp"] is None:
            return r.orphan_deadline(min(h["t"] for h in entry["held"]))
        click = self._click_of(entry)
        if click is None:
            return r.click_deadline(entry["imp"]["t"])
        due = r.conversion_deadline(click["t"])
        pending = self.scheme.pending_until(entry, click)
        return min(due, pending) if pending is not None else due

    @staticmethod
    def _base(key: str, entry: dict, click: dict | None, conv: dict | None) -> dict:
        imp = entry["imp"]
        base = {"impression_id": key, **{f: imp[f] for f in IMPRESSION_FIELDS}, "impression_time_ms": imp["t"],
                "click_id": click["id"] if click else None, "click_time_ms": click["t"] if click else None,
                "conversion_id": conv["id"] if conv else None, "conversion_time_ms": conv["t"] if conv else None,
                "conversion_value": conv["value"] if conv else 0.0}
        return base

    # -- time passing -----------------------------------------------------------------------------------------
    def advance(self, idle: set[str], wall_ms: int, out: Emitted) -> None:
        """Move the clock (``idle``: inputs read to their end and quiet; ``wall_ms`` only paces the idle advance)
        and finish what is due."""
        self.clock.advance(idle, wall_ms)
        self._after_clock(out)

    def advance_to(self, clock_ms: int, out: Emitted) -> None:
        """Move the clock to ``clock_ms`` (a replay of one merged stream in arrival order) and finish what is due."""
        self.clock.advance_to(clock_ms)
        self._after_clock(out)

    def _after_clock(self, out: Emitted) -> None:
        self._finish_due(self.clock_ms, out)
        # Saved with the state when it moved by a step: a restore from an older clock only lets through records
        # the bound would have refused, and writing it on every commit costs every restore (issue 18, item 10).
        saved = self.clock.state()
        if any(abs(v - self._saved.get(k, 0)) >= self.clock_save_step_ms for k, v in saved.items()):
            self.store.put(CLOCK_KEY, saved)
            self._saved = saved

    def finish_all(self, out: Emitted) -> None:
        """Close every window now (the end of a finite input, in replays and tests)."""
        self._finish_due(_END, out)

    def _finish_due(self, clock_ms: int, out: Emitted) -> None:
        for key in self.store.due(clock_ms):
            entry = self.store.get(key)
            if entry is None or entry.get("d", _END) >= clock_ms:
                continue
            self._on_due(key, entry, clock_ms, out)

    def _on_due(self, key: str, entry: dict, clock_ms: int, out: Emitted) -> None:
        if entry["imp"] is None:
            for h in entry["held"]:
                self._reject_held(out, h, f"orphan {h['src']}: no open impression (never arrived, arrived late, "
                                          "or its windows had closed)")
            self.store.delete(key)
            return
        click = self._click_of(entry)
        final = click is None or self.rules.conversion_deadline(click["t"]) < clock_ms
        if not final:  # a scheme's intermediate emission (e.g. the elapsed window) is due
            self._update(key, entry, out)
            return
        conv = self._conversion_of(entry, click)
        base = self._base(key, entry, click, conv)
        self.scheme.on_close(entry, base, click, conv, self.rules.click_deadline(base["impression_time_ms"]),
                             out.examples)
        for v in entry["convs"]:
            if v is conv:
                continue
            if click is None:
                reason = "orphan conversion: its click never arrived (or was not joined)"
            elif v["click"] != click["id"]:
                reason = "conversion names another click than the attributed one"
            elif not self.rules.conversion_in_window(click["t"], v["t"]):
                reason = f"outside conversion window: {(v['t'] - click['t']) / 3_600_000:.1f}h after the click"
            elif not self.rules.conversion_arrived_in_time(click["t"], v["a"]):
                reason = "late event: conversion arrived after its conversion window closed"
            else:
                self.counts["repeat conversion"] += 1
                continue
            self._reject_held(out, v, reason)
        out.matured.append({
            "impression_id": key, "user_id": base["user_id"], "ad_id": base["ad_id"],
            "advertiser_id": base["advertiser_id"], "campaign_id": base["campaign_id"],
            "impression_time_ms": base["impression_time_ms"], "clicked": click is not None,
            "converted": conv is not None, "click_time_ms": base["click_time_ms"],
            "conversion_time_ms": base["conversion_time_ms"], "conversion_value": base["conversion_value"]})
        self.counts["matured"] += 1
        self.store.delete(key)

    # -- dead letters -------------------------------------------------------------------------------------------
    def _reject(self, out: Emitted, source: str, event: dict, arrival: int, offset: int, reason: str) -> None:
        out.rejected.append(Rejected(source, event, arrival, offset, reason))
        self.counts[reason.split(":", 1)[0]] += 1

    def _reject_held(self, out: Emitted, h: dict, reason: str) -> None:
        self._reject(out, h["src"], h["ev"], h["a"], h["o"], reason)


def _new_entry() -> dict:
    return {"imp": None, "clicks": [], "convs": [], "held": [], "sent": {}}


def _has_id(entry: dict, event_id: str) -> bool:
    return any(x["id"] == event_id for part in ("clicks", "convs", "held") for x in entry[part])
