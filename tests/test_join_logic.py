"""The join's rules on hand-made events, and its accuracy on simulated days (no broker needed)."""

from __future__ import annotations

import pytest

from infra.settings import WindowSettings, get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.evaluate import join_accuracy
from label_joiner.join import CLOCK_KEY, SOURCES, Emitted, PartitionJoin
from label_joiner.replay import new_join, replay, replay_each
from label_joiner.rules import Rules
from label_joiner.schemes import DelayCurveScheme, FakeNegativeScheme, NaiveScheme
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate

W = WindowSettings(click_window_s=30, conversion_window_s=3600, allowed_lateness_s=60,
                   conversion_lateness_s=7200, max_future_skew_s=300, max_event_age_s=86_400)
R = Rules.from_settings(W)
ALL = set(SOURCES)
DAY = 86_400_000
T0 = 1_700_000_000_000


def imp(i: str, t: int) -> dict:
    return {"impression_id": i, "user_id": 1, "ad_id": 2, "advertiser_id": 3, "campaign_id": 4, "placement": "feed",
            "position": 0, "device": "mobile", "model_version": "m", "event_time_ms": t}


def click(i: str, t: int, cid: str | None = None) -> dict:
    return {"click_id": cid or f"c-{i}", "impression_id": i, "user_id": 1, "ad_id": 2, "event_time_ms": t}


def conv(i: str, t: int, cid: str | None = None, vid: str | None = None) -> dict:
    return {"conversion_id": vid or f"v-{i}", "click_id": cid or f"c-{i}", "impression_id": i, "user_id": 1,
            "ad_id": 2, "event_time_ms": t, "value": 3.0}


class Driver:
    """Feeds events with their arrival times and collects what the join emits."""

    def __init__(self, scheme=None, windows: WindowSettings = W):
        self.join = PartitionJoin(Rules.from_settings(windows), scheme or NaiveScheme(), new_join(R, None).store)
        self.out = Emitted()
        self.offset = 0

    def send(self, source: str, event: dict, arrival: int | None = None) -> None:
        arrival = event["event_time_ms"] + 1000 if arrival is None else arrival
        self.join.on_event(source, event, arrival, self.offset, self.out)
        self.offset += 1
        self.join.store.commit()

    def advance(self, idle=None, wall_ms: int = 0) -> None:
        """With ``idle`` given, the runtime's step; without, one merged ordered input: its newest arrival."""
        if idle is None:
            self.join.advance_to(max(self.join.clock.newest.values()), self.out)
        else:
            self.join.advance(set(idle), wall_ms, self.out)
        self.join.store.commit()

    def finish(self) -> Emitted:
        self.join.finish_all(self.out)
        self.join.store.commit()
        return self.out

    def reasons(self) -> list[str]:
        return [r.reason.split(":")[0] for r in self.out.rejected]

    def matured(self) -> dict[str, dict]:
        return {m["impression_id"]: m for m in self.out.matured}


@pytest.fixture
def d() -> Driver:
    return Driver()


def test_click_before_impression_is_held_then_joined(d):
    d.send("click", click("a", T0 + 5_000))
    assert d.out.examples == [] and d.join.counts["held click"] == 1
    d.send("impression", imp("a", T0 + 1_000))
    assert [(e["example_id"], e["clicked"]) for e in d.out.examples] == [("a/click/c-a", True)]
    assert d.finish().matured[0]["clicked"]


def test_conversion_before_impression_and_click(d):
    d.send("conversion", conv("a", T0 + 60_000))
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 1_000))
    assert [(e["clicked"], e["converted"]) for e in d.out.examples] == [(True, False), (True, True)]
    d.send("conversion", conv("b", T0 + 70_000))
    d.send("impression", imp("b", T0))  # its click never comes
    d.finish()
    assert d.reasons() == ["orphan conversion"]
    assert d.matured()["a"]["converted"] and not d.matured()["b"]["clicked"]


def test_duplicates_count_once(d):
    for _ in range(2):
        d.send("impression", imp("a", T0))
        d.send("click", click("a", T0 + 1_000))
        d.send("conversion", conv("a", T0 + 60_000))
    matured = d.finish().matured
    assert len(matured) == 1 and matured[0]["converted"] and matured[0]["conversion_value"] == 3.0
    assert d.join.counts["duplicate impression"] == d.join.counts["duplicate click"] == 1
    assert d.join.counts["duplicate conversion"] == 1
    assert len({e["example_id"] for e in d.out.examples}) == len(d.out.examples) == 2


def test_outside_windows_and_late_are_rejected(d):
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 31_000))
    d.send("impression", imp("b", T0))
    d.send("click", click("b", T0 + 1_000))
    d.send("conversion", conv("b", T0 + 1_000 + 3_601_000))
    d.send("impression", imp("c", T0), arrival=T0 + 61_000)  # more than the lateness after it happened
    d.send("impression", imp("e", T0))
    d.send("click", click("e", T0 + 2_000), arrival=T0 + 30_000 + 60_001)  # after its click window closed
    d.finish()
    # Each is decided when it arrives (the conversion's click is known): dead letters in arrival order.
    assert d.reasons() == ["outside click window", "outside conversion window", "late event", "late event"]
    assert not d.matured()["e"]["clicked"]


def test_a_late_conversion_joins_while_its_window_is_open(d):
    """Issue: a conversion 1 h after its click, delivered 1 h late, was dead-lettered."""
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 1_000))
    for k in range(1, 200):  # traffic moves on for two hours
        d.send("impression", imp(f"x{k}", T0 + k * 36_000))
        d.advance()
    d.send("conversion", conv("a", T0 + 3_601_000), arrival=T0 + 2 * 3_600_000)
    d.advance()
    assert d.reasons() == []
    assert [e["converted"] for e in d.out.examples if e["impression_id"] == "a"] == [False, True]
    d.finish()
    assert d.matured()["a"]["converted"]


def test_a_quiet_conversion_input_does_not_stall_labelling(d):
    """Issue: 2 h of impressions and clicks without conversions gave no matured label."""
    for k in range(2 * 3600 // 10):
        t = T0 + k * 10_000
        d.send("impression", imp(f"i{k}", t))
        if k % 5 == 0:
            d.send("click", click(f"i{k}", t + 2_000))
        d.advance(idle={"conversion", "feedback"})  # the runtime: both read to their end
    matured = d.matured()
    clicked_open = {f"i{k}" for k in range(0, 720, 5)}
    assert len(matured) > 500 and not set(matured) & clicked_open
    assert all(not m["clicked"] for m in matured.values())
    assert sum(1 for e in d.out.examples if not e["clicked"]) == len(matured)
    # While conversions are not known to be idle, nothing that needs them can close.
    still = Driver()
    still.send("impression", imp("a", T0))
    still.send("impression", imp("b", T0 + 3_600_000))
    still.advance(idle=set())
    assert still.out.matured == []


def test_implausible_event_times_touch_no_other_label(d):
    """Issue: one impression dated years ahead made the rest of its partition late."""
    d.send("impression", imp("future", T0 + 5 * 365 * DAY), arrival=T0)
    d.send("click", click("past", T0 - 30 * DAY), arrival=T0)
    d.advance()
    assert d.join.clock_ms < T0 + DAY
    for k in range(20):
        d.send("impression", imp(f"i{k}", T0 + k * 1000))
        d.send("click", click(f"i{k}", T0 + k * 1000 + 500))
    d.advance()
    d.finish()
    assert d.reasons() == ["future event time", "event time older than retention"]
    assert sum(m["clicked"] for m in d.out.matured) == 20


def test_earliest_click_wins_whatever_the_delivery_order(d):
    """Stream and batch share one rule: the earliest click (time, then id), and its conversion."""
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 9_000, cid="late-click"))
    d.send("click", click("a", T0 + 3_000, cid="early-click"))
    d.send("conversion", conv("a", T0 + 60_000, cid="late-click", vid="v1"))
    d.send("conversion", conv("a", T0 + 90_000, cid="early-click", vid="v2"))
    d.finish()
    m = d.matured()["a"]
    assert (m["click_time_ms"], m["conversion_time_ms"]) == (T0 + 3_000, T0 + 90_000)
    ids = [e["example_id"] for e in d.out.examples]
    assert ids == ["a/click/late-click", "a/click/early-click", "a/conversion/v2"]
    assert d.out.examples[1]["is_correction"]
    assert d.reasons() == ["conversion names another click than the attributed one"]


def test_outputs_are_identical_on_replay():
    """Same events, different batching: the same records, byte for byte (no wall clock in them)."""
    cfg = SimulatorConfig(hours=1, users=5_000, ads=1_000, impressions_per_hour=6_000, speed=0, cvr=0.1,
                          prediction_log=False, seed=4, start="2026-11-10T00:00:00Z")
    settings = get_settings().model_copy(update={"windows": W})
    sched = generate(cfg, settings, drain=True).schedule
    runs = [replay(new_join(R, FakeNegativeScheme()), sched, advance_every=k).outputs for k in (1, 97)]
    for field in ("examples", "matured"):
        a, b = (sorted(getattr(r, field), key=lambda x: x.get("example_id", x["impression_id"])) for r in runs)
        assert a == b and len(a) > 1000
    # The same inputs are dead-lettered (by offset). An event that fails two rules may name either: a
    # conversion 44 h after its click is "outside conversion window" while its entry is open, "orphan" after.
    a, b = ({(r.offset, r.reason.split(":")[0].replace("orphan", "outside")) for r in run.rejected} for run in runs)
    assert {o for o, _ in a} == {o for o, _ in b} and len(a) > 50



def test_replaying_into_several_joins_at_once_equals_replaying_each_alone():
    """``replay_each`` decodes a delivery once for every join: each join's outputs (defects and dead letters of
    a run with corrupt records included) are those of its own replay."""
    cfg = SimulatorConfig(hours=2, users=2_000, ads=400, impressions_per_hour=3_000, speed=0, cvr=0.2,
                          prediction_log=False, seed=9, start="2026-11-10T00:00:00Z")
    sched = generate(cfg, get_settings().model_copy(update={"windows": W}), drain=True).schedule
    alone = [replay(new_join(R, scheme()), sched, advance_every=50) for scheme in (NaiveScheme, FakeNegativeScheme)]
    together = replay_each([new_join(R, scheme()) for scheme in (NaiveScheme, FakeNegativeScheme)], sched,
                           advance_every=50)
    for a, b in zip(alone, together, strict=True):
        assert a.outputs.examples == b.outputs.examples and a.outputs.matured == b.outputs.matured
        assert a.outputs.rejected == b.outputs.rejected and a.undecodable == b.undecodable
    assert together[0].outputs.examples != together[1].outputs.examples  # the schemes differ
    assert len(together[1].outputs.examples) > 500 and together[0].outputs.rejected

def test_delay_curve_scheme_waits_the_elapsed_window_then_corrects():
    curve = DelayCurve(grid_s=[0.0, 3600.0, 86_400.0], cdf_values=[0.0, 0.5, 1.0], cvr=0.2, n_clicks=100,
                       n_conversions=20, window_s=86_400.0)
    d = Driver(DelayCurveScheme(curve, elapsed_windows_s=[3600, 7200]),
               W.model_copy(update={"conversion_window_s": 86_400}))
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 1_000))
    d.send("impression", imp("b", T0))
    d.send("click", click("b", T0 + 1_000))
    d.send("conversion", conv("b", T0 + 600_000))  # inside the elapsed window
    assert d.out.examples == []
    d.send("impression", imp("later", T0 + 3_700_000))
    d.advance()
    got = {e["impression_id"]: e for e in d.out.examples}
    assert got["a"]["label_ctcvr"] == pytest.approx(0.2 * 0.5 / (1 - 0.2 * 0.5)) and got["a"]["delay_cdf"] == 0.5
    assert got["b"]["label_ctcvr"] == 1.0 and got["b"]["converted"]
    assert [e["example_id"] for e in d.out.examples if e["impression_id"] != "later"] == [
        "a/elapsed0/c-a", "b/elapsed0/c-b"]
    d.send("impression", imp("later2", T0 + 7_300_000))
    d.advance()  # a's second checkpoint (2 h): a lower soft label, superseding the first
    second = d.out.examples[-1]
    assert second["example_id"] == "a/elapsed1/c-a" and second["is_correction"]
    assert second["label_ctcvr"] < got["a"]["label_ctcvr"]
    d.send("conversion", conv("a", T0 + 8_000_000))
    assert d.out.examples[-1] is second  # decided once the clock has passed the conversion's record time
    d.send("impression", imp("later3", T0 + 8_100_000))
    d.advance()
    last = d.out.examples[-1]
    assert last["example_id"] == "a/conversion/v-a" and last["is_correction"] and last["label_ctcvr"] == 1.0


def test_simulated_hours_match_ground_truth():
    settings = get_settings()
    cfg = SimulatorConfig(hours=6, users=20_000, ads=5_000, impressions_per_hour=20_000, cvr=0.3, speed=0,
                          prediction_log=False, late_share=0.05)
    gen = generate(cfg, settings, drain=True)
    rules = Rules.from_settings(settings.windows)
    join = new_join(rules, NaiveScheme())
    result = replay(join, gen.schedule, advance_every=50)
    acc = join_accuracy(result.matured_frame(), gen.truth, rules)
    assert acc.expected > 80_000 and acc.exact, acc
    t = gen.truth
    assert result.undecodable == int((gen.schedule.corruption >= 0).sum())
    # Late conversions are in the data and joined (their conversion window was still open).
    late_joined = t["conversion_late"] & t["converted_in_window"] & ~t["conversion_malformed"] & t["clicked"]
    assert late_joined.sum() > 0
    matured = result.matured_frame().set_index("impression_id")
    assert matured.loc[t.loc[late_joined & ~t["click_late"] & ~t["impression_late"] & ~t["click_malformed"]
                             & ~t["impression_malformed"], "impression_id"], "converted"].all()
    ids = [m["impression_id"] for m in result.outputs.matured]
    assert len(ids) == len(set(ids))
    assert join.counts["duplicate impression"] > 0
    assert set(join.store.records) == {CLOCK_KEY}  # every entry released; only the clock remains


def feedback(i: str, t: int, fid: str | None = None, kind: str = "hide") -> dict:
    return {"feedback_id": fid or f"f-{i}", "impression_id": i, "user_id": 1, "ad_id": 2, "kind": kind,
            "event_time_ms": t}


def test_negative_feedback_is_labelled_within_its_window(d):
    """Issue 20, item 8: a hide or report within the feedback window labels its impression, once; one outside the
    window or after the click window's lateness is a dead letter with its reason."""
    d.send("feedback", feedback("held", T0 + 5_000))  # before its impression: held until it comes
    d.send("impression", imp("held", T0), arrival=T0 + 7_000)
    d.send("impression", imp("clicked", T0))
    d.send("click", click("clicked", T0 + 2_000))
    d.send("feedback", feedback("clicked", T0 + 20_000, kind="report"))
    d.send("impression", imp("twice", T0))
    d.send("feedback", feedback("twice", T0 + 9_000, fid="b"))
    d.send("feedback", feedback("twice", T0 + 8_000, fid="a"))  # earlier: this one counts, once
    d.send("feedback", feedback("twice", T0 + 8_000, fid="a"))  # a repeated delivery
    d.send("impression", imp("outside", T0))
    d.send("feedback", feedback("outside", T0 + W.feedback_window_s * 1000 + 1))
    d.send("impression", imp("late", T0))
    d.send("feedback", feedback("late", T0 + 10_000), arrival=R.click_deadline(T0) + 1)
    d.send("impression", imp("none", T0))
    d.finish()
    assert d.reasons() == ["outside feedback window", "late event"]
    matured = d.matured()
    assert {k for k, m in matured.items() if m["negative_feedback"]} == {"held", "clicked", "twice"}
    assert d.join.counts["duplicate feedback"] == 1 and d.join.counts["repeat feedback"] == 1
    label_neg = {e["impression_id"]: e["label_neg"] for e in d.out.examples if not e["clicked"]}
    assert label_neg == {"held": 1.0, "twice": 1.0, "outside": 0.0, "late": 0.0, "none": 0.0}
    # The click example is emitted at the click, before the feedback window closed: its label is unknown.
    assert [e["label_neg"] for e in d.out.examples if e["impression_id"] == "clicked"] == [None]
