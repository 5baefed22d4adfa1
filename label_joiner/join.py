"""The attribution join as plain state transitions, independent of the stream runtime.

Key: impression id; impressions, clicks and conversions are co-partitioned by it, so one partition
holds every event of an impression. Windows (event time): click within ``click_window_s`` after the
impression, conversion within ``conversion_window_s`` after the click. State: one small dict per open
impression (``state[impression_id]``) in any MutableMapping: a dict in tests, a faust Table in the
worker. Output: training examples (at click, at conversion, at click-window close), matured labels
(when the last window closes) and rejected events with their reason (late, orphan, outside a window).

Watermark, per partition: the *slowest* of its three inputs (the newest event time seen on each of
impressions, clicks and conversions) minus the allowed lateness, as in Flink. Once the whole stream has
been silent for ``idle_timeout_s`` of wall-clock time and the runtime confirms that every input has
been read to its end, the newest event time of the partition counts instead, so that the last windows
close. An event older than the watermark is late. An entry is
finished once the watermark passes its expiry; it then leaves a small *done marker* (its click and
conversion ids) for ``done_retention_s`` of event time, so that an event
replayed after a crash (at-least-once delivery) is recognised as a duplicate, not joined twice.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from infra.settings import WindowSettings
from label_joiner.schemes import LabelScheme
from schemas.events import Click, Conversion, Event, Impression, MaturedLabel, TrainingExample

IMPRESSION_FIELDS = ("impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "placement", "position",
                     "device", "model_version", "event_time_ms")
SOURCES = ("impression", "click", "conversion")
# + partition: the newest event time and the next offset per input, kept in the state itself
PROGRESS_KEY = "__progress__/"


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


def _held_event(h: dict) -> Click | Conversion:
    cls = Click if h["kind"] == "click" else Conversion
    return cls.model_validate({k: v for k, v in h.items() if k != "kind"})


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
    >>> [m.clicked for m in j.flush().matured]
    [True]
    """

    def __init__(self, windows: WindowSettings, scheme: LabelScheme, state: MutableMapping[str, dict],
                 clock: Callable[[], float] = time.monotonic):
        self.click_ms = int(windows.click_window_s * 1000)
        self.conv_ms = int(windows.conversion_window_s * 1000)
        self.lateness_ms = int(windows.allowed_lateness_s * 1000)
        self.idle_s = windows.idle_timeout_s
        self.done_retention_ms = int(windows.done_retention_s * 1000)
        self.scheme = scheme
        self.state = state
        self.clock = clock
        self.counts: Counter[str] = Counter()
        # partition -> source -> newest event time seen by this process. A restarted worker starts empty
        # (each input holds the watermark until its replayed events arrive, in order from the committed
        # offset); the newest time in the recovered state counts only once the stream is idle.
        self._newest: dict[int, dict[str, int]] = {}
        # partition -> source -> next input offset to process, saved with the state (see ``position``).
        self._positions: dict[int, dict[str, int]] = {}
        self._recovered: dict[int, int] = {}
        # Wall time since which no event arrived; None while the stream is not known to be running
        # (starting, recovering, rebalancing): then it is never idle.
        self._quiet_since: float | None = None
        self._caught_up = True  # a runtime that can tell (the faust worker) keeps this up to date
        # Per partition: heap of (expiry, impression id), rebuilt from the state on first use. Entries are
        # finished only while processing an event of their own partition, so a faust table writes each
        # change to the changelog partition that holds the key.
        self._due: dict[int, list[tuple[int, str]]] = {}
        self._indexed = False

    # -- watermark --------------------------------------------------------------------------------------
    def _newest_of(self, partition: int) -> dict[str, int]:
        self._ensure_index()
        return self._newest.setdefault(partition, {})

    def save_progress(self) -> None:
        """Store each partition's input progress in the state, after the changes it accounts for.

        Written to the same changelog partition as those changes, and after them, so a recovered
        progress never runs ahead of the recovered state."""
        for p in set(self._newest) | set(self._positions):
            key = f"{PROGRESS_KEY}{p}"
            progress = {"p": p, "progress": True, "newest": dict(self._newest.get(p, {})),
                        "positions": dict(self._positions.get(p, {}))}
            if self.state.get(key) != progress:
                self.state[key] = progress

    def position(self, partition: int, source: str) -> int | None:
        """The next offset of ``source``'s ``partition`` that the state does not account for yet.

        The runtime marks every input message it hands to the join (:meth:`processed`); the positions
        are saved with the state, so after a restart a message below its position is known to be in the
        recovered state already, and one above it reveals messages the runtime never delivered."""
        self._ensure_index()
        return self._positions.get(partition, {}).get(source)

    def processed(self, partition: int, source: str, offset: int) -> None:
        """Record that the input message at ``offset`` has been joined (or dead-lettered)."""
        positions = self._positions.setdefault(partition, {})
        positions[source] = max(positions.get(source, 0), offset + 1)

    def now_ms(self, partition: int) -> int:
        """The newest event time seen on ``partition`` (any input)."""
        return max(self._newest_of(partition).values(), default=0)

    def quiet(self) -> bool:
        """True once no event at all has arrived for ``idle_timeout_s`` of a running stream."""
        return self._quiet_since is not None and self.clock() - self._quiet_since >= self.idle_s

    def idle(self) -> bool:
        """Quiet, and the runtime has confirmed that no input is waiting (:meth:`caught_up`)."""
        return self._caught_up and self.quiet()

    def caught_up(self, no_input_waiting: bool) -> None:
        """The runtime's word on whether every input partition has been read to its end. A stream that
        is quiet because the broker is unreachable or the consumer lags is not idle: closing windows on
        the newest event time then would reject the clicks still on their way as late."""
        self._caught_up = no_input_waiting

    def running(self, is_running: bool) -> None:
        """Tell the joiner whether its input is live (start the idle clock) or being recovered or
        reassigned (stop the clock, and index the state again once it is back)."""
        if not is_running:
            self._quiet_since = None
            self._indexed = False
        elif self._quiet_since is None:
            self._quiet_since = self.clock()

    def lateness_watermark_ms(self, partition: int) -> int:
        """The slowest input's progress minus the lateness: an event older than this is late.

        An input that is behind (a backlog being caught up, a replay after a restart, or simply sparse)
        holds it back, so it never declares its own in-flight events late."""
        newest = self._newest_of(partition)
        return min(newest.get(s, 0) for s in SOURCES) - self.lateness_ms

    def watermark_ms(self, partition: int) -> int:
        """What closes windows: the lateness watermark, or the newest event's once the stream is idle."""
        if self.idle():
            self._ensure_index()
            progress = max(self.now_ms(partition), self._recovered.get(partition, 0))
            return progress - self.lateness_ms
        return self.lateness_watermark_ms(partition)

    def partitions(self) -> list[int]:
        """Partitions that have open state or have seen events."""
        self._ensure_index()
        return sorted(set(self._newest) | {p for p, heap in self._due.items() if heap})

    def watermarks(self) -> dict[int, int]:
        """The watermark of every partition seen so far."""
        return {p: self.watermark_ms(p) for p in sorted(self._newest)}

    def _observe(self, source: str, partition: int, t: int) -> None:
        newest = self._newest_of(partition)
        newest[source] = max(newest.get(source, 0), t)
        self._quiet_since = self.clock()

    # -- events -----------------------------------------------------------------------------------------
    def on_impression(self, imp: Impression, partition: int = 0) -> Outputs:
        out = Outputs()
        entry = self._entry(imp.impression_id, partition)
        if entry.get("done") or entry["imp"] is not None:
            self.counts["duplicate impression"] += 1
            return out
        if imp.event_time_ms < self.lateness_watermark_ms(partition):
            return self._reject(out, imp, "late event: impression older than the watermark")
        self._observe("impression", partition, imp.event_time_ms)
        entry["imp"] = {f: getattr(imp, f) for f in IMPRESSION_FIELDS}
        held, entry["held"] = entry["held"], []
        for h in sorted(held, key=lambda h: h["event_time_ms"]):
            if h["kind"] == "conversion" and entry["click"] is None:
                entry["held"].append(h)  # still waiting for its click
            else:
                self._apply(entry, _held_event(h), partition, out)
        self._store(imp.impression_id, entry)
        return out

    def on_click(self, click: Click, partition: int = 0) -> Outputs:
        return self._on_outcome(click, click.click_id, partition)

    def on_conversion(self, conv: Conversion, partition: int = 0) -> Outputs:
        return self._on_outcome(conv, conv.conversion_id, partition)

    def _on_outcome(self, event: Click | Conversion, event_id: str, partition: int) -> Outputs:
        out = Outputs()
        entry = self._entry(event.impression_id, partition)
        if entry.get("done"):
            if event_id in entry["ids"]:
                self.counts[f"duplicate {event.NAME}"] += 1
                return out
            return self._reject(out, event, f"late event: {event.NAME} after its impression's windows closed")
        if self._known(entry, event, event_id):  # e.g. replayed after a restart: already joined or held
            self.counts[f"duplicate {event.NAME}"] += 1
            return out
        if event.event_time_ms < self.lateness_watermark_ms(partition):
            return self._reject(out, event, f"late event: {event.NAME} older than the watermark")
        self._observe(event.NAME, partition, event.event_time_ms)
        if entry["imp"] is None or (isinstance(event, Conversion) and entry["click"] is None):
            entry["held"].append({"kind": event.NAME, **event.model_dump()})
            self.counts[f"held {event.NAME}"] += 1
        else:
            self._apply(entry, event, partition, out)
        self._store(event.impression_id, entry)
        return out

    @staticmethod
    def _known(entry: dict, event: Click | Conversion, event_id: str) -> bool:
        joined = entry["click"] if isinstance(event, Click) else entry["conv"]
        if joined is not None and joined["id"] == event_id:
            return True
        return {"kind": event.NAME, **event.model_dump()} in entry["held"]

    def _apply(self, entry: dict, event: Click | Conversion, partition: int, out: Outputs) -> None:
        imp, now = entry["imp"], self.now_ms(partition)
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
            out.examples.extend(self.scheme.on_click(self._base(entry), now))
            # A conversion held while the click was missing can be joined now.
            held, entry["held"] = entry["held"], []
            for h in held:
                self._apply(entry, _held_event(h), partition, out)
            return
        if entry["conv"] is not None:
            same = entry["conv"]["id"] == event.conversion_id
            self.counts["duplicate conversion" if same else "repeat conversion"] += 1
            return
        if event.click_id != entry["click"]["id"]:
            self._reject(out, event, "conversion names another click than the attributed one")
            return
        delay = event.event_time_ms - entry["click"]["t"]
        if not 0 <= delay <= self.conv_ms:
            self._reject(out, event, f"outside conversion window: {delay / 3_600_000:.1f}h after the click")
            return
        entry["conv"] = {"id": event.conversion_id, "t": event.event_time_ms, "value": event.value}
        out.examples.extend(self.scheme.on_conversion(self._base(entry), now))

    # -- time passing -----------------------------------------------------------------------------------
    def _expiry(self, entry: dict) -> int:
        if entry.get("done"):
            return entry["t"] + self.done_retention_ms
        if entry["imp"] is None:  # only held clicks / conversions: orphans once their impression would be late
            return min(h["event_time_ms"] for h in entry["held"])
        if entry["click"] is not None:
            return entry["click"]["t"] + self.conv_ms
        return entry["imp"]["event_time_ms"] + self.click_ms

    def advance(self, partition: int = 0) -> Outputs:
        """Finish the entries of ``partition`` whose expiry the watermark has passed."""
        return self._finish_due(partition, self.watermark_ms(partition))

    def flush(self) -> Outputs:
        """Finish every open entry now, as if every window had closed (end of a finite input)."""
        out = Outputs()
        for partition in {e["p"] for e in self.state.values() if not e.get("progress")}:
            out.extend(self._finish_due(partition, 2**62))
        return out

    def _ensure_index(self) -> None:
        """Build the expiry heaps and the newest recovered event time from the state (once, at start)."""
        if self._indexed:
            return
        self._indexed = True
        # Everything below is rebuilt from the state alone, which after a rebalance holds just the
        # partitions this worker owns now, each as of its last write.
        self._due, self._recovered, self._newest, self._positions = {}, {}, {}, {}
        for k, e in self.state.items():
            if e.get("progress"):
                newest = self._newest.setdefault(e["p"], {})
                for source, t in e["newest"].items():
                    newest[source] = max(newest.get(source, 0), t)
                positions = self._positions.setdefault(e["p"], {})
                for source, offset in e.get("positions", {}).items():
                    positions[source] = max(positions.get(source, 0), offset)
                continue
            self._due.setdefault(e["p"], []).append((self._expiry(e), k))
            self._recovered[e["p"]] = max(self._recovered.get(e["p"], 0), self._newest_time(e))
        for heap in self._due.values():
            heapq.heapify(heap)

    def _newest_time(self, entry: dict) -> int:
        """The newest event time an entry records (a done marker: its watermark plus the lateness)."""
        if entry.get("done"):
            return entry["t"] + self.lateness_ms
        times = [h["event_time_ms"] for h in entry["held"]]
        if entry["imp"] is not None:
            times.append(entry["imp"]["event_time_ms"])
        times += [x["t"] for x in (entry["click"], entry["conv"]) if x is not None]
        return max(times)

    def _finish_due(self, partition: int, wm: int) -> Outputs:
        self._ensure_index()
        out = Outputs()
        due = self._due.setdefault(partition, [])
        while due and due[0][0] < wm:
            expiry, key = heapq.heappop(due)
            entry = self.state.get(key)
            if entry is None:
                continue
            now_expiry = self._expiry(entry)
            if now_expiry != expiry:  # stale: the entry moved on and was indexed again when stored
                continue
            if entry.get("done"):
                del self.state[key]
            else:
                self._finish(key, entry, wm, out)
        return out

    def _finish(self, key: str, entry: dict, wm: int, out: Outputs) -> None:
        if entry["imp"] is None:
            for h in entry["held"]:
                self._reject(out, _held_event(h),
                             f"orphan {h['kind']}: no open impression (never arrived, or its windows had closed)")
            del self.state[key]
            return
        for h in entry["held"]:  # a conversion whose click never arrived
            self._reject(out, _held_event(h), "orphan conversion: its click never arrived")
        base = self._base(entry)
        if entry["click"] is None:
            out.examples.extend(self.scheme.on_click_window_closed(base, self.now_ms(entry["p"])))
        out.matured.append(MaturedLabel(
            impression_id=key, user_id=base["user_id"], ad_id=base["ad_id"], advertiser_id=base["advertiser_id"],
            campaign_id=base["campaign_id"], impression_time_ms=base["impression_time_ms"],
            clicked=entry["click"] is not None, converted=entry["conv"] is not None,
            click_time_ms=base["click_time_ms"], conversion_time_ms=base["conversion_time_ms"],
            conversion_value=entry["conv"]["value"] if entry["conv"] else 0.0))
        self.counts["matured"] += 1
        ids = [x["id"] for x in (entry["click"], entry["conv"]) if x is not None]
        self._store(key, {"done": True, "p": entry["p"], "t": min(wm, 2**53), "ids": ids})

    # -- helpers ----------------------------------------------------------------------------------------
    def _entry(self, key: str, partition: int) -> dict:
        return self.state.get(key) or {"imp": None, "click": None, "conv": None, "held": [], "p": partition}

    def _store(self, key: str, entry: dict) -> None:
        self.state[key] = entry
        if self._indexed:
            heapq.heappush(self._due.setdefault(entry["p"], []), (self._expiry(entry), key))

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
