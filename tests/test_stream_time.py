"""Stream time that cannot be fooled (no broker needed: the join's pure logic, and the processor for the wall-clock
bound). Within the out-of-orderness bound the labels do not depend on batching, pauses, restarts, replay or
producer clock skew; beyond it an event is a dead letter with its reason, never a silent drop; a pause with every
input idle never moves the clock to the wall clock."""

from __future__ import annotations

import random
import time

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from infra.settings import WindowSettings, get_settings
from label_joiner.delay_curve import DelayCurve
from label_joiner.join import CLOCK_KEY, SOURCES, Emitted, PartitionJoin
from label_joiner.processor import JoinProcessor
from label_joiner.replay import SOURCE
from label_joiner.rules import Rules
from label_joiner.schemes import make_scheme
from schemas.codec import decode, encode
from schemas.events import Click, Impression
from streams.engine import Outbox
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate
from streams.state import MemoryStore
from tests.test_join_logic import click, conv, imp

B = 5_000  # the out-of-orderness bound of these tests (ms)
W = WindowSettings(click_window_s=30, conversion_window_s=3600, allowed_lateness_s=60, conversion_lateness_s=7200,
                   max_future_skew_s=300, max_event_age_s=30 * 86_400, max_out_of_orderness_s=B / 1000,
                   elapsed_windows_s=[600.0, 1_200.0, 2_400.0])
R = Rules.from_settings(W)
T0 = 1_700_000_000_000  # years before the wall clock, as a backfill or a replay is
ALL = set(SOURCES)
QUIET = {"conversion", "feedback"}  # what the runtime reports for an input without traffic (read to its end and quiet)
CURVE = DelayCurve(grid_s=[0.0, 600.0, 3_600.0], cdf_values=[0.0, 0.5, 1.0], cvr=0.3, n_clicks=100, n_conversions=30,
                   window_s=3_600.0)


class DiskLikeStore(MemoryStore):
    """A memory store that hands out copies, as RocksDB does: changing a record read from it changes nothing
    committed until it is put and committed (so a crash before the commit loses exactly the step)."""

    def _committed(self, key: str) -> dict | None:
        record = self.records.get(key)
        return None if record is None else orjson.loads(orjson.dumps(record))


class Stream:
    """The join driven as the runtime drives it: batches sorted by arrival, then the clock moves."""

    def __init__(self, scheme: str = "naive", idle_advance_rate: float = 0.0):
        self.store = DiskLikeStore()
        self.scheme, self.rate = scheme, idle_advance_rate
        self.join = self._new_join()
        self.out = Emitted()

    def _new_join(self) -> PartitionJoin:
        return PartitionJoin(R, make_scheme(self.scheme, CURVE, W.elapsed_windows_s), self.store,
                             out_of_orderness_ms=B, idle_advance_rate=self.rate)

    def batch(self, events: list[tuple[str, dict, int]], idle: set[str] = frozenset(), wall_ms: int = 0) -> None:
        for n, (source, event, arrival) in enumerate(sorted(events, key=lambda e: e[2])):
            self.join.on_event(source, dict(event), arrival, n, self.out)
        self.join.advance(set(idle), wall_ms, self.out)
        self.store.commit()

    def restart(self, from_changelog: bool = False) -> None:
        """A new process: the join from the committed state (``from_changelog``: the store restored anew from its
        committed records, as on a new machine; what was pending is lost)."""
        if from_changelog:
            committed = [(k.encode(), orjson.dumps(v)) for k, v in self.store.records.items()]
            self.store = DiskLikeStore()
            self.store.restore(committed, len(committed))
        self.join = self._new_join()

    def matured(self) -> dict[str, dict]:
        return {m["impression_id"]: m for m in self.out.matured}

    def reasons(self) -> list[str]:
        return [r.reason.split(":")[0] for r in self.out.rejected]


def test_a_pause_with_every_input_idle_holds_the_clock():
    """Issue: a quiet pause moved the clock to the wall clock for good; a click 4 s after its impression, read
    after the pause, became an orphan and the impression was labelled not clicked."""
    labels = []
    for pause in (False, True):
        s = Stream()
        s.batch([("impression", imp("a", T0), T0 + 100), ("impression", imp("b", T0 + 50), T0 + 150)])
        if pause:
            for k in range(1, 30):  # minutes of every input idle, with the wall clock far ahead of the data
                s.batch([], idle=ALL, wall_ms=int(time.time() * 1000) + k * 60_000)
            assert s.join.clock_ms < T0
        s.batch([("click", click("a", T0 + 4_000), T0 + 4_100), ("impression", imp("c", T0 + 200_000), T0 + 200_100),
                 ("click", click("c", T0 + 201_000), T0 + 201_100)])
        s.join.finish_all(s.out)
        labels.append((s.matured(), sorted(e["example_id"] for e in s.out.examples)))
        assert s.reasons() == [] and s.matured()["a"]["clicked"] and not s.matured()["b"]["clicked"]
    assert labels[0] == labels[1]


def test_an_idle_advance_goes_from_the_last_data_never_to_the_wall_clock():
    s = Stream(idle_advance_rate=1.0)
    s.batch([("impression", imp("a", T0), T0 + 100)], wall_ms=10**13)
    s.batch([], idle=ALL, wall_ms=10**13 + 20_000)  # 20 s of processing time with every input idle
    assert s.join.clock_ms == T0 + 100 - B + 20_000
    # A click from before the pause, read only now, is behind the clock: a dead letter that says so.
    s.batch([("click", click("a", T0 + 4_000), T0 + 4_100)])
    assert s.reasons() == ["behind the clock"]


def test_a_producer_behind_within_the_bound_gets_the_rules_label():
    """Issue: a click stamped 500 ms before its deadline, from a producer 2 s behind, was read after the clock had
    passed the deadline: an orphan click for the stream, clicked for the rule (and the batch twin)."""
    deadline = R.click_deadline(T0)
    s = Stream()
    s.batch([("impression", imp("a", T0), T0 + 100)])
    others = [("impression", imp(f"x{k}", deadline + k * 100 - 60_000), deadline + k * 100) for k in range(16)]
    others += [("click", click(f"x{k}", deadline + k * 100 - 59_000), deadline + k * 100) for k in range(16)]
    s.batch(others, idle=QUIET)  # the fast producer's records: 1.5 s past a's deadline
    assert s.join.clock_ms == deadline + 1_500 - B
    s.batch([("click", click("a", T0 + 29_000), deadline - 500)], idle=QUIET)  # the slow producer's, 2 s behind
    s.join.finish_all(s.out)
    assert R.click_arrived_in_time(T0, deadline - 500) and s.matured()["a"]["clicked"], s.reasons()
    assert s.reasons() == []

    # Beyond the bound (the other producer 10 s ahead): a dead letter with its reason, never a silent drop.
    s = Stream()
    s.batch([("impression", imp("a", T0), T0 + 100)])
    s.batch([(src, {**e, "event_time_ms": e["event_time_ms"] + 8_500}, a + 8_500) for src, e, a in others], idle=QUIET)
    s.batch([("click", click("a", T0 + 29_000), deadline - 500)], idle=QUIET)
    s.join.finish_all(s.out)
    assert s.reasons() == ["behind the clock"] and not s.matured()["a"]["clicked"]


def test_a_buffered_postback_after_an_idle_conversion_input_is_a_dead_letter_with_its_reason():
    """Issue: with the conversion input idle, impressions and clicks carried the clock past a click's deadline;
    a postback stamped 5 s before the deadline then gave a silent 'not converted'."""
    s = Stream()
    s.batch([("impression", imp("a", T0), T0 + 100), ("click", click("a", T0 + 1_000), T0 + 1_100)])
    deadline = R.conversion_deadline(T0 + 1_000)
    s.batch([("impression", imp("x", deadline + 20_000), deadline + 20_000),
             ("click", click("x", deadline + 21_000), deadline + 21_000)], idle={"conversion", "feedback"})
    assert s.join.clock_ms == deadline + 15_000
    s.batch([("conversion", conv("a", T0 + 60_000), deadline - 5_000)])
    assert s.reasons() == ["behind the clock"] and s.out.rejected[0].source == "conversion"
    s.join.finish_all(s.out)
    assert not s.matured()["a"]["converted"]


def test_the_clock_record_is_written_by_steps():
    """Issue: the clock record went to the changelog on almost every commit."""
    s = Stream()
    writes = 0
    for k in range(600):  # 10 minutes of traffic, one record per second, one batch each
        t = T0 + k * 1_000
        s.join.on_event("impression", imp(f"i{k}", t), t, k, s.out)
        s.join.advance(set(), 0, s.out)
        writes += CLOCK_KEY in s.store.pending
        s.store.commit()
    assert 1 <= writes <= 600 / 60 + 1, writes


def test_a_record_stamped_ahead_of_the_wall_clock_moves_no_clock():
    """Issue: one producer an hour fast, the other inputs idle, pushed the saved clock an hour ahead."""
    settings = get_settings().model_copy(update={"windows": W})
    proc = JoinProcessor(settings, make_scheme("naive"), 0, MemoryStore())
    now = int(time.time() * 1000)
    records = []
    for n, (event, topic, ts) in enumerate([
            (Impression(impression_id="fast", request_id="r", user_id=1, ad_id=2, advertiser_id=3, campaign_id=4,
                        placement="feed", position=0, device="mobile", bid=1.0, event_time_ms=now + 3_600_000,
                        model_version="m", served_pctr=0.1, served_pcvr=0.1, feature_ref="f"),
             settings.topics.impressions, now + 3_600_000),
            (Click(click_id="c", impression_id="ok", user_id=1, ad_id=2, event_time_ms=now), settings.topics.clicks,
             now)]):
        k, v, h = encode(event)
        records.append(ConsumerRecord(topic=topic, partition=0, offset=n, timestamp=ts, timestamp_type=0, key=k,
                                      value=v, checksum=None, serialized_key_size=len(k), serialized_value_size=len(v),
                                      headers=tuple(h)))
    out = Outbox()
    proc.process(records, out)
    proc.advance({settings.topics.impressions, settings.topics.conversions}, now, out)
    dead = [r for r in out.records if r[0] == settings.topics.dead_letters]
    assert len(dead) == 1 and b"record time ahead of the wall clock" in dead[0][2]
    assert proc.join.clock.newest["impression"] == 0 and proc.join.clock_ms <= now


# -- the property: random batching, pauses, restarts, repeats and producer skew within the bound ---------------------

def _run_events(seed: int) -> list[tuple[str, dict, int]]:
    cfg = SimulatorConfig(hours=0.5, users=200, ads=60, impressions_per_hour=1_200, ctr=0.15, cvr=0.3, speed=0,
                          prediction_log=False, seed=seed, start="2026-11-10T00:00:00Z", conv_fast_mean_s=600.0,
                          conv_slow_median_s=3_000.0, duplicate_share=0.03, out_of_order_share=0.05)
    settings = get_settings().model_copy(update={"windows": W})
    schedule = generate(cfg, settings, drain=True).schedule
    cls_of = {schedule.topics[c]: c for c in SOURCE if c in schedule.topics}
    events = []
    for topic, _key, value, headers, when in iter_messages(schedule):
        cls = cls_of.get(topic)
        if cls is not None:
            try:
                events.append((SOURCE[cls], decode(cls, value, headers).model_dump(), int(when)))
            except ValueError:
                continue
    return events


@pytest.fixture(scope="module")
def runs() -> list[list[tuple[str, dict, int]]]:
    return [_run_events(seed) for seed in (21, 22)]


def _reference(events: list[tuple[str, dict, int, int]], scheme: str) -> Emitted:
    """One merged input in record-time order (what the batch twin's rules see)."""
    join = PartitionJoin(R, make_scheme(scheme, CURVE, W.elapsed_windows_s), MemoryStore())
    out = Emitted()
    for n, (source, event, arrival, _) in enumerate(sorted(events, key=lambda e: e[2])):
        join.on_event(source, dict(event), arrival, n, out)
        join.advance_to(arrival, out)
        join.store.commit()
    join.finish_all(out)
    return out


def _stream(events: list[tuple[str, dict, int, int]], scheme: str, rng: random.Random) -> Emitted:
    """The same records through random fetches: per input, records in append order (send time) stamped by their
    producer's clock; a fetch takes a random number from each input's head, up to what was sent by now; a random
    share of the caught-up inputs is reported idle; random wall-clock pauses; crashes that lose the step's state
    and outputs and re-read its records from the committed state."""
    queues: dict[str, list] = {s: [] for s in sorted(ALL)}
    for source, event, stamped, send in sorted(events, key=lambda e: e[3]):
        queues[source].append((send, event, stamped))
    pos = dict.fromkeys(sorted(ALL), 0)
    s = Stream(scheme)
    now, wall = min(e[3] for e in events), 10**13
    while any(pos[src] < len(q) for src, q in queues.items()):
        now += int(rng.expovariate(1 / 20_000))
        wall += rng.choice([10, 1_000, 600_000])
        start = dict(pos)
        batch = []
        for src, q in queues.items():
            sent = pos[src]
            while sent < len(q) and q[sent][0] <= now:
                sent += 1
            take = rng.randint(0, sent - pos[src]) if rng.random() < 0.8 else sent - pos[src]
            batch += [(src, e, stamped) for _, e, stamped in q[pos[src]:pos[src] + take]]
            pos[src] += take
        caught_up = {src for src, q in queues.items() if pos[src] == len(q) or q[pos[src]][0] > now}
        idle = {src for src in caught_up if rng.random() < 0.5}
        before = (len(s.out.examples), len(s.out.matured), len(s.out.rejected))
        for n, (source, event, arrival) in enumerate(sorted(batch, key=lambda e: e[2])):
            s.join.on_event(source, dict(event), arrival, n, s.out)
        s.join.advance(idle, wall, s.out)
        if rng.random() < 0.03:  # kill -9 before the commit: nothing of this step happened; the state comes back
            del s.out.examples[before[0]:], s.out.matured[before[1]:], s.out.rejected[before[2]:]
            pos = start
            s.restart(from_changelog=True)
            continue
        s.store.commit()
        if rng.random() < 0.03:  # a clean restart after a commit
            s.restart()
    s.join.finish_all(s.out)
    return s.out


def _last_example(examples: list[dict]) -> dict[str, dict]:
    return {e["impression_id"]: e for e in examples}


@pytest.mark.parametrize("scheme", ["naive", "fnw", "delay_curve"])
def test_labels_do_not_depend_on_batching_pauses_restarts_or_skew(runs, scheme):
    """100 random schedules per scheme: the stream's outputs equal the record-time-ordered replay's (the batch
    twin's rule), whatever the batching, pauses, restarts, repeated deliveries and producer skew within the bound;
    no output id appears twice."""
    checked = 0
    for k in range(100):
        rng = random.Random(1000 * k + len(scheme))
        events = runs[k % len(runs)]
        # Two producers per input; the second one's clock runs up to half the bound behind (its records are appended
        # in send order, stamped by its clock), and a few records are delivered twice (a producer retry).
        skew = rng.randint(0, B // 2)
        stamped = []  # (source, event, record time, send time)
        for source, event, sent in events:
            record_time = sent - (skew if rng.random() < 0.5 else 0)
            stamped.append((source, event, record_time, sent))
            if rng.random() < 0.01:
                stamped.append((source, event, record_time, sent + rng.randint(0, B // 2)))
        want, got = _reference(stamped, scheme), _stream(stamped, scheme, rng)
        assert not [r.reason for r in got.rejected if r.reason.startswith("behind the clock")]
        got_ids = [e["example_id"] for e in got.examples]
        assert len(set(got_ids)) == len(got_ids), "an example was emitted twice"
        assert len({m["impression_id"] for m in got.matured}) == len(got.matured), "a label matured twice"
        assert sorted(got.matured, key=lambda m: m["impression_id"]) == \
            sorted(want.matured, key=lambda m: m["impression_id"]), f"schedule {k}"
        assert sorted(got.examples, key=lambda e: e["example_id"]) == \
            sorted(want.examples, key=lambda e: e["example_id"]), f"schedule {k}"
        assert _last_example(got.examples) == _last_example(want.examples), f"schedule {k}"
        checked += len(got.matured)
    assert checked > 100 * 300
