"""The attribution join of one input partition, as plain state transitions (no Kafka, no event loop).

Key: impression id (impressions, clicks and conversions are co-partitioned by it, so one partition holds
every event of an impression). Windows, in event time (``label_joiner.rules``): a click within the click
window after its impression, a conversion within the conversion window after its click; among several,
the earliest (event time, then id) counts; a hide or report (``feedback``) within the feedback window after its
impression, the earliest counting, decided with the clicks (the feedback window lies inside the click window,
and feedback has the clicks' lateness). Lateness, in arrival time (the Kafka record timestamp): an
impression or click is joined when it arrives within the allowed lateness of its click window's end, a
conversion within the conversion lateness of its conversion window's end; later ones are dead letters.

State: one record per open impression in a :class:`streams.state.Store`, due (``"d"``) when its next
window closes. It keeps only what the rule needs, at O(1) per event: the attributed click, its attributed
conversion, events still waiting for their impression or click, and a bounded set of seen ids
(:class:`StateBounds`); every other click or conversion is decided when it arrives (a repeat, or a dead
letter with its reason). Clock: a :class:`streams.event_clock.EventClock` over the three inputs' arrival times (the
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

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import orjson

from label_joiner.rules import Rules
from label_joiner.schemes import LabelScheme
from streams.event_clock import EventClock

SOURCES = ("impression", "click", "conversion", "feedback")
IMPRESSION_FIELDS = ("user_id", "ad_id", "advertiser_id", "campaign_id", "placement", "position", "device",
                     "model_version")
CLOCK_KEY = "\x00meta/clock"
_END = 2**62


@dataclass(frozen=True)
class StateBounds:
    """What one impression may keep (issue 18, item 5): events waiting for their impression or click, by count and
    bytes (beyond them an event is a dead letter), and how many of its click and conversion ids are remembered to
    drop repeated deliveries. With inputs capped at 64 KB (``processor.MAX_EVENT_BYTES``) a record stays well
    under Kafka's default 1 MB message size, so the changelog never refuses it."""

    held_events: int = 32
    held_bytes: int = 256 * 1024
    seen_ids: int = 64


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
                 idle_advance_rate: float = 0.0, clock_save_step_ms: int = 60_000,
                 bounds: StateBounds = StateBounds()):
        self.rules = rules
        self.bounds = bounds
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
        entry = self._get(key, out)
        if source == "impression":
            self._on_impression(key, entry, event, arrival, offset, out)
        else:
            self._on_other(source, key, entry, event, arrival, offset, out)

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
        for h in sorted(held, key=lambda h: (h["src"] == "conversion", h["t"], h["id"])):  # clicks first
            self._place(entry, h, out)
        self._update(key, entry, out)

    def _on_other(self, source: str, key: str, entry: dict | None, ev: dict, arrival: int, offset: int,
                  out: Emitted) -> None:
        """A click, conversion or feedback: dropped when its id was seen, held until its impression, else placed."""
        if source == "click":
            h = {"src": "click", "id": ev["click_id"], "t": ev["event_time_ms"], "a": arrival, "o": offset, "ev": ev}
        elif source == "feedback":
            h = {"src": "feedback", "id": ev["feedback_id"], "t": ev["event_time_ms"], "a": arrival, "o": offset,
                 "ev": ev}
        else:
            h = {"src": "conversion", "id": ev["conversion_id"], "t": ev["event_time_ms"], "a": arrival, "o": offset,
                 "click": ev["click_id"], "value": ev["value"], "ev": ev}
        seen_id = _seen_id(source, h["id"])
        if entry is None:
            entry = _new_entry()
        elif seen_id in entry["seen"]:
            self.counts[f"duplicate {source}"] += 1
            return
        if entry["imp"] is None:
            if not self._hold(entry, h, out):
                return
            self.counts[f"held {source}"] += 1
        else:
            self._place(entry, h, out)
        _remember(entry["seen"], seen_id, self.bounds.seen_ids)
        self._update(key, entry, out)

    def _hold(self, entry: dict, h: dict, out: Emitted) -> bool:
        """Keep ``h`` until what it waits for (its impression, or a conversion's click) arrives, within the bounds;
        beyond them it is a dead letter (the record must stay far below the changelog's message size)."""
        size = len(orjson.dumps(h))
        held_bytes = sum(x.get("n", 0) for x in entry["held"]) + size
        b = self.bounds
        if len(entry["held"]) >= b.held_events or held_bytes > b.held_bytes:
            self._reject_held(out, h, f"too many events held for one impression: {len(entry['held'])} events, "
                                      f"{held_bytes:,} bytes (bounds {b.held_events}, {b.held_bytes:,})")
            return False
        h["n"] = size
        entry["held"].append(h)
        return True

    def _place(self, entry: dict, h: dict, out: Emitted) -> None:
        """Join a click or conversion with a known impression, keeping only what the rule needs: the attributed
        click (the earliest valid one by time, then id), its earliest valid conversion, and conversions whose
        click has not arrived yet. Every other event is decided now: counted as a repeat or a dead letter."""
        if h["src"] == "click":
            self._place_click(entry, h, out)
            return
        if h["src"] == "feedback":
            self._place_feedback(entry, h, out)
            return
        best = entry["click"]
        if best is not None and h["click"] == best["id"]:
            self._place_conversion(entry, h, out)
        elif _seen_id("click", h["click"]) in entry["seen"]:  # its click came and is not (or no longer) attributed
            self._reject_held(out, h, _unattributed(best))
        else:
            self._hold(entry, h, out)

    def _place_click(self, entry: dict, c: dict, out: Emitted) -> None:
        imp_t = entry["imp"]["t"]
        if not self.rules.click_in_window(imp_t, c["t"]):
            self._reject_held(out, c, f"outside click window: {(c['t'] - imp_t) / 1000:.1f}s after the impression")
            return
        if not self.rules.click_arrived_in_time(imp_t, c["a"]):
            self._reject_held(out, c, "late event: click arrived after its click window closed")
            return
        best = entry["click"]
        attributed = best is None or (c["t"], c["id"]) < (best["t"], best["id"])
        if best is not None:
            self.counts["repeat click"] += 1
        if attributed:
            entry["click"] = {"id": c["id"], "t": c["t"], "a": c["a"]}
            if entry["conv"] is not None:  # the conversion of the click no longer attributed
                self._reject_held(out, entry["conv"], _unattributed(entry["click"]))
                entry["conv"] = None
        waiting = [v for v in entry["held"] if v["click"] == c["id"]]
        if waiting:
            entry["held"] = [v for v in entry["held"] if v["click"] != c["id"]]
            for v in sorted(waiting, key=lambda v: (v["t"], v["id"])):
                if attributed:
                    self._place_conversion(entry, v, out)
                else:
                    self._reject_held(out, v, _unattributed(entry["click"]))

    def _place_feedback(self, entry: dict, f: dict, out: Emitted) -> None:
        """A hide or report of a known impression: the earliest valid one (time, then id) counts."""
        imp_t = entry["imp"]["t"]
        if not self.rules.feedback_in_window(imp_t, f["t"]):
            self._reject_held(out, f, f"outside feedback window: {(f['t'] - imp_t) / 1000:.1f}s after the impression")
            return
        if not self.rules.feedback_arrived_in_time(imp_t, f["a"]):
            self._reject_held(out, f, "late event: feedback arrived after its click window closed")
            return
        best = entry.get("neg")
        if best is not None:
            self.counts["repeat feedback"] += 1
        if best is None or (f["t"], f["id"]) < (best["t"], best["id"]):
            entry["neg"] = {"id": f["id"], "t": f["t"]}

    def _place_conversion(self, entry: dict, v: dict, out: Emitted) -> None:
        """A conversion naming the attributed click: the earliest valid one (time, then id) counts."""
        click = entry["click"]
        if not self.rules.conversion_in_window(click["t"], v["t"]):
            self._reject_held(out, v, f"outside conversion window: {(v['t'] - click['t']) / 3_600_000:.1f}h after "
                                      "the click")
            return
        if not self.rules.conversion_arrived_in_time(click["t"], v["a"]):
            self._reject_held(out, v, "late event: conversion arrived after its conversion window closed")
            return
        best = entry["conv"]
        if best is not None:
            self.counts["repeat conversion"] += 1
        if best is None or (v["t"], v["id"]) < (best["t"], best["id"]):
            entry["conv"] = v

    def _get(self, key: str, out: Emitted) -> dict | None:
        """The impression's record; one written before the bounded state (every click and conversion in
        ``clicks``/``convs``) is rewritten to today's form, its extra conversions decided as if they came now."""
        entry = self.store.get(key)
        if entry is None or "clicks" not in entry:
            return entry
        clicks, convs = entry.pop("clicks"), entry.pop("convs")
        seen = [_seen_id(h["src"], h["id"]) for h in [*entry["held"], *convs]] + \
            [_seen_id("click", c["id"]) for c in clicks]  # clicks last: kept first by the bound
        entry.update(click=min(clicks, key=lambda c: (c["t"], c["id"])) if clicks else None, conv=None,
                     seen=seen[-self.bounds.seen_ids:])
        for v in sorted(convs, key=lambda v: (v["t"], v["id"])):
            self._place(entry, v, out)
        self.store.put(key, entry)  # once: its dead letters are not emitted again
        self.counts["state record upgraded"] += 1
        return entry

    # -- the entry's labels ----------------------------------------------------------------------------------
    def _update(self, key: str, entry: dict, out: Emitted) -> None:
        """Emit what changed (per the scheme), set the next due time, store."""
        click, conv = entry["click"], entry["conv"]
        if entry["imp"] is not None and click is not None:  # schemes emit nothing before a click
            self.scheme.on_change(entry, self._base(key, entry, click, conv), click, conv, self.clock_ms,
                                  out.examples)
        entry["d"] = self._due(entry)
        self.store.put(key, entry)

    def _due(self, entry: dict) -> int:
        r = self.rules
        if entry["imp"] is None:
            return r.orphan_deadline(min(h["t"] for h in entry["held"]))
        click = entry["click"]
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
                "conversion_value": conv["value"] if conv else 0.0,
                "negative_feedback": entry.get("neg") is not None}  # (records older than feedback have no "neg")
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
            entry = self._get(key, out)
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
        click = entry["click"]
        final = click is None or self.rules.conversion_deadline(click["t"]) < clock_ms
        if not final:  # a scheme's intermediate emission (e.g. the elapsed window) is due
            self._update(key, entry, out)
            return
        conv = entry["conv"]
        base = self._base(key, entry, click, conv)
        self.scheme.on_close(entry, base, click, conv, self.rules.click_deadline(base["impression_time_ms"]),
                             out.examples)
        for v in entry["held"]:  # conversions whose click never came
            self._reject_held(out, v, _unattributed(click))
        out.matured.append({
            "impression_id": key, "user_id": base["user_id"], "ad_id": base["ad_id"],
            "advertiser_id": base["advertiser_id"], "campaign_id": base["campaign_id"],
            "impression_time_ms": base["impression_time_ms"], "clicked": click is not None,
            "converted": conv is not None, "click_time_ms": base["click_time_ms"],
            "conversion_time_ms": base["conversion_time_ms"], "conversion_value": base["conversion_value"],
            "negative_feedback": base["negative_feedback"]})
        self.counts["matured"] += 1
        self.store.delete(key)

    # -- dead letters -------------------------------------------------------------------------------------------
    def _reject(self, out: Emitted, source: str, event: dict, arrival: int, offset: int, reason: str) -> None:
        out.rejected.append(Rejected(source, event, arrival, offset, reason))
        self.counts[reason.split(":", 1)[0]] += 1

    def _reject_held(self, out: Emitted, h: dict, reason: str) -> None:
        self._reject(out, h["src"], h["ev"], h["a"], h["o"], reason)


def _new_entry() -> dict:
    """One impression's state: ``imp`` its fields, ``click`` the attributed click, ``conv`` its attributed conversion
    (with the event, to dead-letter it if an earlier click comes), ``neg`` its counted hide or report, ``held``
    events waiting for their impression or click (each with its size ``n``), ``seen`` the newest ids of its
    clicks and conversions, ``sent`` the scheme's bookkeeping, ``d`` when it is next due."""
    return {"imp": None, "click": None, "conv": None, "neg": None, "held": [], "seen": [], "sent": {}}


def _seen_id(source: str, event_id: str) -> str:
    """A short, stable key for the seen-id set (an id may be kilobytes long)."""
    if len(event_id) > 40:
        event_id = hashlib.blake2b(event_id.encode(), digest_size=10).hexdigest()
    return f"{source[:2]}:{event_id}"


def _remember(seen: list[str], seen_id: str, bound: int) -> None:
    seen.append(seen_id)
    if len(seen) > bound:
        del seen[0]


def _unattributed(click: dict | None) -> str:
    if click is None:
        return "orphan conversion: its click never arrived (or was not joined)"
    return "conversion names another click than the attributed one"
