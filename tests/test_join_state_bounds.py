"""One impression's state is bounded and each event costs O(1) (issue 18, item 5): thousands of repeated clicks or
conversions of one impression keep a record of constant size; events waiting for their impression are bounded, the
excess a dead letter with its reason; the worst case stays far below the changelog's 1 MB message size; and the
labels do not depend on the order the events of one impression arrive in."""

from __future__ import annotations

import itertools

import orjson

from label_joiner.join import PartitionJoin, StateBounds
from label_joiner.processor import MAX_EVENT_BYTES
from label_joiner.schemes import make_scheme
from streams.state import MemoryStore
from tests.test_join_logic import T0, Driver, R, click, conv, imp

KAFKA_DEFAULT_MESSAGE_BYTES = 1_048_588


def _record_bytes(d: Driver, key: str) -> int:
    return len(orjson.dumps(d.join.store.get(key)))


def test_repeated_clicks_and_conversions_keep_a_constant_record():
    d = Driver()
    d.send("impression", imp("a", T0))
    d.send("click", click("a", T0 + 1_000, cid="c0"))
    sizes = []
    for n in range(20_000):  # 20,000 distinct repeated clicks: the old state kept them all, at O(n) per event
        d.send("click", click("a", T0 + 2_000 + n % 20_000, cid=f"c{n + 1}"), arrival=T0 + 3_000)
        if n in (100, 19_999):
            sizes.append(_record_bytes(d, "a"))
    for n in range(5_000):  # 5,000 conversions of the attributed click: 4,800 passed 1 MB before
        d.send("conversion", conv("a", T0 + 60_000 + n, cid="c0", vid=f"v{n}"), arrival=T0 + 70_000)
        if n in (100, 4_999):
            sizes.append(_record_bytes(d, "a"))
    # Once the seen-id set is full the record stops growing: 200x the events, the same size but for longer ids.
    assert sizes[1] - sizes[0] < 300 and sizes[3] - sizes[2] < 300 and max(sizes) < 4_000, sizes
    assert d.join.counts["repeat click"] == 20_000 and d.join.counts["repeat conversion"] == 4_999
    d.finish()
    m = d.matured()["a"]
    assert m["clicked"] and m["converted"] and m["conversion_time_ms"] == T0 + 60_000
    assert d.out.rejected == []


def test_a_repeated_delivery_is_dropped_by_its_id():
    d = Driver()
    d.send("impression", imp("a", T0))
    for _ in range(3):
        d.send("click", click("a", T0 + 1_000))
        d.send("conversion", conv("a", T0 + 2_000))
    assert d.join.counts["duplicate click"] == 2 and d.join.counts["duplicate conversion"] == 2
    assert d.join.counts["repeat click"] == 0


def test_events_waiting_for_their_impression_are_bounded():
    bounds = StateBounds(held_events=8, held_bytes=1_000_000)
    d = Driver()
    d.join = PartitionJoin(R, make_scheme("naive"), MemoryStore(), bounds=bounds)
    for n in range(12):
        d.send("click", click("a", T0 + 1_000 + n, cid=f"c{n}"))
    assert d.reasons() == ["too many events held for one impression"] * 4
    d.send("impression", imp("a", T0))
    d.finish()
    assert d.matured()["a"]["clicked"] and d.matured()["a"]["click_time_ms"] == T0 + 1_000


def test_the_largest_possible_record_fits_a_changelog_message():
    """Every input at the 64 KB cap: the impression, the attributed click (its id), its conversion and a full set
    of waiting events."""
    pad = "x" * (MAX_EVENT_BYTES - 1_000)
    d = Driver()
    big_imp = {**imp("a", T0), "placement": pad[: MAX_EVENT_BYTES // 4], "device": pad[: MAX_EVENT_BYTES // 4],
               "model_version": pad[: MAX_EVENT_BYTES // 4]}
    d.send("impression", big_imp)
    d.send("click", click("a", T0 + 1_000, cid="k" + pad[: MAX_EVENT_BYTES // 2]))
    d.send("conversion", {**conv("a", T0 + 2_000, cid="k" + pad[: MAX_EVENT_BYTES // 2], vid="v" +
                                 pad[: MAX_EVENT_BYTES // 3])})
    for n in range(100):  # conversions naming clicks that never come: held until the bound, then dead letters
        d.send("conversion", conv("a", T0 + 3_000 + n, cid=f"{n}" + pad[: MAX_EVENT_BYTES // 3], vid=f"w{n}"))
    size = _record_bytes(d, "a")
    assert size < KAFKA_DEFAULT_MESSAGE_BYTES * 0.8, size
    assert "too many events held for one impression" in d.reasons()


def test_labels_do_not_depend_on_the_order_of_one_impressions_events():
    """Three clicks (one outside the window) and conversions naming each, in every arrival order: the same label;
    every event joined, counted as a repeat, or a dead letter."""
    events = [("impression", imp("a", T0)),
              ("click", click("a", T0 + 5_000, cid="c-late")), ("click", click("a", T0 + 2_000, cid="c-first")),
              ("click", click("a", T0 + 40_000, cid="c-out")),
              ("conversion", conv("a", T0 + 60_000, cid="c-late", vid="v1")),
              ("conversion", conv("a", T0 + 90_000, cid="c-first", vid="v2")),
              ("conversion", conv("a", T0 + 70_000, cid="c-first", vid="v3"))]
    seen = set()
    for order in itertools.permutations(events):
        d = Driver()
        for source, ev in order:
            d.send(source, ev, arrival=T0 + 50_000)
        d.finish()
        m = d.matured()["a"]
        seen.add((m["click_time_ms"], m["conversion_time_ms"]))
        accounted = len(d.out.rejected) + d.join.counts["repeat click"] + d.join.counts["repeat conversion"]
        assert accounted == 4, (order, d.reasons(), d.join.counts)  # 7 events, 3 of them joined
    assert seen == {(T0 + 2_000, T0 + 70_000)}


def test_a_record_written_before_the_bounded_state_is_upgraded():
    """A worker upgraded over an existing changelog: an open impression stored in the old form (every click and
    conversion kept) gets the label the old code would have given, and its extra conversions are decided once."""
    d = Driver()
    old = {"imp": {"t": T0, **{f: imp("a", T0)[f] for f in ("user_id", "ad_id", "advertiser_id", "campaign_id",
                                                             "placement", "position", "device", "model_version")}},
           "clicks": [{"id": "c2", "t": T0 + 5_000, "a": T0 + 6_000}, {"id": "c1", "t": T0 + 2_000, "a": T0 + 9_000}],
           "convs": [{"src": "conversion", "id": f"v{k}", "t": T0 + 60_000 + k, "a": T0 + 70_000, "o": k,
                      "click": cid, "value": 1.0, "ev": conv("a", T0 + 60_000 + k, cid=cid, vid=f"v{k}")}
                     for k, cid in ((0, "c2"), (1, "c1"), (2, "c1"))],
           "held": [], "sent": {"click": "c1"}, "d": T0 + 40_000}
    d.join.store.put("a", old)
    d.join.store.commit()
    d.send("click", click("a", T0 + 2_000, cid="c1"), arrival=T0 + 10_000)  # a repeated delivery: still dropped
    assert d.join.counts["duplicate click"] == 1 and d.join.counts["state record upgraded"] == 1
    assert d.reasons() == ["conversion names another click than the attributed one"]  # v0, of c2
    d.finish()
    m = d.matured()["a"]
    assert m["click_time_ms"] == T0 + 2_000 and m["conversion_time_ms"] == T0 + 60_001
    assert d.join.counts["state record upgraded"] == 1 and len(d.out.rejected) == 1
