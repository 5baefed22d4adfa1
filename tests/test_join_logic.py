"""The join's rules on hand-made events, and its accuracy on a simulated day (no broker needed)."""

from __future__ import annotations

import pytest

from infra.settings import WindowSettings, get_settings
from label_joiner.evaluate import join_accuracy
from label_joiner.join import LabelJoiner
from label_joiner.replay import replay
from label_joiner.schemes import NaiveScheme
from schemas import Click, Conversion, Impression
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate

W = WindowSettings(click_window_s=30, conversion_window_s=3600, allowed_lateness_s=60, idle_timeout_s=1e9)


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def imp(i: str, t: int) -> Impression:
    return Impression(impression_id=i, request_id="r", user_id=1, ad_id=2, advertiser_id=3, campaign_id=4,
                      placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=t, model_version="m",
                      served_pctr=0.1, served_pcvr=0.1, feature_ref=i)


def click(i: str, t: int) -> Click:
    return Click(click_id=f"c-{i}", impression_id=i, user_id=1, ad_id=2, event_time_ms=t)


def conv(i: str, t: int) -> Conversion:
    return Conversion(conversion_id=f"v-{i}", click_id=f"c-{i}", impression_id=i, user_id=1, ad_id=2,
                      event_time_ms=t, value=3.0)


@pytest.fixture
def joiner() -> LabelJoiner:
    """A joiner on a clock that stands still: the stream never goes idle."""
    return LabelJoiner(W, NaiveScheme(), state={}, clock=FakeClock())


def test_click_before_impression_is_held_then_joined(joiner):
    out = joiner.on_click(click("a", 5_000))
    assert out.examples == [] and joiner.counts["held click"] == 1
    out = joiner.on_impression(imp("a", 1_000))
    assert [e.clicked for e in out.examples] == [True]
    assert [m.clicked for m in joiner.flush().matured] == [True]


def test_conversion_before_impression_and_click(joiner):
    joiner.on_conversion(conv("a", 60_000))
    joiner.on_impression(imp("a", 0))
    assert joiner.state["a"]["held"][0]["kind"] == "conversion"
    out = joiner.on_click(click("a", 1_000))
    assert [(e.clicked, e.converted) for e in out.examples] == [(True, False), (True, True)]
    joiner.on_conversion(conv("b", 70_000))
    joiner.on_impression(imp("b", 0))  # its click never comes
    reasons = [r.reason.split(":")[0] for r in joiner.flush().rejected]
    assert reasons == ["orphan conversion"]


def test_duplicates_count_once(joiner):
    joiner.on_impression(imp("a", 0))
    joiner.on_impression(imp("a", 0))
    joiner.on_click(click("a", 1_000))
    joiner.on_click(click("a", 1_000))
    joiner.on_conversion(conv("a", 60_000))
    joiner.on_conversion(conv("a", 60_000))
    matured = joiner.flush().matured
    assert len(matured) == 1 and matured[0].converted and matured[0].conversion_value == 3.0
    assert joiner.counts["duplicate impression"] == joiner.counts["duplicate click"] == 1
    assert joiner.counts["duplicate conversion"] == 1


def test_outside_windows_and_late_are_rejected(joiner):
    joiner.on_impression(imp("a", 0))
    out = joiner.on_click(click("a", 31_000))
    assert "outside click window" in out.rejected[0].reason
    joiner.on_impression(imp("b", 0))
    joiner.on_click(click("b", 1_000))
    out = joiner.on_conversion(conv("b", 1_000 + 3_601_000))
    assert "outside conversion window" in out.rejected[0].reason
    joiner.on_impression(imp("c", 3_000_000))  # every input moves far ahead: so does the watermark
    joiner.on_click(click("c", 3_000_500))
    assert joiner.watermark_ms(0) == 3_000_000 - 60_000  # the slowest input: impressions
    out = joiner.on_click(click("z", 10_000))
    assert out.rejected[0].reason.startswith("late event")


def test_orphans_are_reported_when_their_impression_would_be_late(joiner):
    joiner.on_click(click("ghost", 1_000))
    joiner.on_impression(imp("x", 200_000))
    joiner.on_click(click("x", 201_000))
    joiner.on_conversion(conv("x", 300_000))
    out = joiner.advance(0)
    assert [r.reason.split(":")[0] for r in out.rejected] == ["orphan click"]


def test_replayed_events_after_maturity_are_duplicates_not_new_entries(joiner):
    joiner.on_impression(imp("a", 0))
    joiner.on_click(click("a", 1_000))
    joiner.on_impression(imp("later", 4_000_000))
    joiner.on_click(click("later", 4_000_500))
    joiner.on_conversion(conv("later", 4_001_000))
    assert [m.impression_id for m in joiner.advance(0).matured] == ["a"]
    joiner.on_impression(imp("a", 0))  # a replay after a crash
    out = joiner.on_click(click("a", 1_000))
    assert out.examples == [] and out.rejected == []
    assert joiner.flush().matured[0].impression_id == "later"


def test_state_is_released(joiner):
    for k in range(1000):
        joiner.on_impression(imp(f"i{k}", k * 1000))
        if k % 10 == 0:
            joiner.on_click(click(f"i{k}", k * 1000 + 500))
            joiner.on_conversion(conv(f"i{k}", k * 1000 + 700))
        joiner.advance(0)
    # Unclicked impressions stay open for the click window plus lateness (~90 s: ~90 of them); clicked
    # ones for the conversion window (all 100 here); finished ones leave done markers.
    open_entries = [e for e in joiner.state.values() if not e.get("done")]
    assert len([e for e in open_entries if e["click"] is None]) < 110
    assert len([e for e in open_entries if e["click"] is not None]) == 100
    joiner.flush()
    assert not [e for e in joiner.state.values() if not e.get("done")]


def test_idle_stream_closes_the_last_windows():
    clock = FakeClock()
    j = LabelJoiner(W.model_copy(update={"idle_timeout_s": 5}), NaiveScheme(), state={}, clock=clock)
    j.on_impression(imp("a", 0))
    j.on_impression(imp("b", 500_000))
    assert j.watermark_ms(0) < 0  # clicks and conversions never seen: they hold it back
    assert j.advance(0).matured == []
    clock.now = 10
    assert j.watermark_ms(0) == 500_000 - 60_000
    assert [m.impression_id for m in j.advance(0).matured] == ["a"]


def test_simulated_day_matches_ground_truth():
    settings = get_settings()
    cfg = SimulatorConfig(hours=6, users=20_000, ads=5_000, impressions_per_hour=20_000, cvr=0.05, speed=0,
                          prediction_log=False)
    gen = generate(cfg, settings, drain=True)
    joiner = LabelJoiner(settings.windows, NaiveScheme(), state={}, clock=FakeClock())
    result = replay(joiner, gen.schedule)
    acc = join_accuracy(result.matured_frame(), gen.truth, settings.windows)
    assert acc.expected > 80_000 and acc.exact, acc
    # Every defect the simulator injected is accounted for.
    t = gen.truth
    assert result.undecodable == int((gen.schedule.corruption >= 0).sum())
    # Nothing lost, nothing twice: every intact impression is either matured once or rejected as late.
    matured_ids = [m.impression_id for m in result.outputs.matured]
    late_ids = {r.event.impression_id for r in result.outputs.rejected
                if isinstance(r.event, Impression) and r.reason.startswith("late event")}
    assert len(matured_ids) == len(set(matured_ids))
    assert set(matured_ids) | late_ids == set(t.loc[~t["impression_malformed"], "impression_id"])
    assert not set(matured_ids) & late_ids
    assert late_ids <= set(t.loc[t["impression_late"], "impression_id"])
    assert joiner.counts["duplicate impression"] == int(
        (t["impression_duplicated"] & ~t["impression_malformed"] & ~t["impression_late"]).sum())
