"""The attribution rules, written once and used by the stream join and by its Spark batch twin.

Every function takes plain numbers (the stream) or Spark Columns (the batch twin): only ``+``, ``-``,
comparisons and ``&`` are used, which both understand. Times are epoch milliseconds.

*Event time* (``t``) is when something happened, from the payload; *arrival* (``arrival``) is the Kafka
record's timestamp, the producer's clock when it sent the record (or the broker's, for a topic with
``LogAppendTime``). Arrival, not the order in which a worker happens to read its inputs, decides whether
an event came too late, so the stream, a replay of it and the batch twin all make the same decision.

>>> r = Rules(click_window_ms=30_000, conversion_window_ms=3_600_000, lateness_ms=600_000,
...           conversion_lateness_ms=7_200_000, max_future_skew_ms=300_000, max_age_ms=86_400_000)
>>> r.click_in_window(imp_t=0, click_t=20_000), r.click_in_window(imp_t=0, click_t=31_000)
(True, False)
>>> r.click_arrived_in_time(imp_t=0, arrival=630_000)
True
>>> r.conversion_arrived_in_time(click_t=0, arrival=3_600_000 + 7_200_001)
False
>>> r.event_time_problem(t=10**13, arrival=0)
'future event time'
>>> first_of([(5, "b"), (3, "z"), (3, "a")])
(3, 'a')
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.settings import WindowSettings


@dataclass(frozen=True)
class Rules:
    """Windows and lateness, in milliseconds."""

    click_window_ms: int
    conversion_window_ms: int
    lateness_ms: int
    conversion_lateness_ms: int
    max_future_skew_ms: int
    max_age_ms: int
    feedback_window_ms: int = 30_000  # a hide or report after the impression; at most the click window

    @classmethod
    def from_settings(cls, w: WindowSettings) -> Rules:
        return cls(click_window_ms=int(w.click_window_s * 1000), conversion_window_ms=int(w.conversion_window_s * 1000),
                   lateness_ms=int(w.allowed_lateness_s * 1000),
                   conversion_lateness_ms=int(w.conversion_lateness_s * 1000),
                   max_future_skew_ms=int(w.max_future_skew_s * 1000), max_age_ms=int(w.max_event_age_s * 1000),
                   feedback_window_ms=int(w.feedback_window_s * 1000))

    # -- windows (event time) -----------------------------------------------------------------------------
    def click_in_window(self, imp_t, click_t):
        """A click counts when it happened within the click window after its impression."""
        return (click_t >= imp_t) & (click_t <= imp_t + self.click_window_ms)

    def feedback_in_window(self, imp_t, feedback_t):
        """A hide or report counts when it happened within the feedback window after its impression."""
        return (feedback_t >= imp_t) & (feedback_t <= imp_t + self.feedback_window_ms)

    def conversion_in_window(self, click_t, conv_t):
        """A conversion counts when it happened within the conversion window after its click."""
        return (conv_t >= click_t) & (conv_t <= click_t + self.conversion_window_ms)

    # -- arrival deadlines (record timestamps) --------------------------------------------------------------
    def impression_deadline(self, imp_t):
        return imp_t + self.lateness_ms

    def click_deadline(self, imp_t):
        """The last arrival time at which a click of this impression is still joined."""
        return imp_t + self.click_window_ms + self.lateness_ms

    def conversion_deadline(self, click_t):
        """The last arrival time at which a conversion of this click is still joined: its own window
        plus the conversions' lateness (advertisers' postbacks come in batches, hours late)."""
        return click_t + self.conversion_window_ms + self.conversion_lateness_ms

    def orphan_deadline(self, t):
        """How long a click or conversion waits for the impression (or click) it names: until an
        impression or click that could still be joined with it can no longer arrive."""
        return t + self.click_window_ms + self.lateness_ms

    def impression_arrived_in_time(self, imp_t, arrival):
        return arrival <= self.impression_deadline(imp_t)

    def click_arrived_in_time(self, imp_t, arrival):
        return arrival <= self.click_deadline(imp_t)

    def feedback_arrived_in_time(self, imp_t, arrival):
        """Feedback is decided with the clicks, when the click window's lateness has passed."""
        return arrival <= self.click_deadline(imp_t)

    def conversion_arrived_in_time(self, click_t, arrival):
        return arrival <= self.conversion_deadline(click_t)

    # -- implausible timestamps -------------------------------------------------------------------------
    def plausible(self, t, arrival):
        """An event time within ``max_future_skew`` ahead of, and ``max_age`` behind, its arrival."""
        return (t <= arrival + self.max_future_skew_ms) & (t >= arrival - self.max_age_ms)

    def event_time_problem(self, t: int, arrival: int) -> str | None:
        """Why an event's time cannot be trusted (the dead-letter reason), or None."""
        if t > arrival + self.max_future_skew_ms:
            return "future event time"
        if t < arrival - self.max_age_ms:
            return "event time older than retention"
        return None


def first_of(candidates):
    """The one that counts among several valid clicks (or conversions) of an impression: the earliest
    event time, then the smallest id. ``candidates`` are (event time, id) pairs."""
    return min(candidates)


# The same order for Spark: ``Window.partitionBy(...).orderBy(*FIRST_ORDER)`` over columns named so.
FIRST_ORDER = ("t", "id")
