"""Real-time features: the two-stage worker on the real broker and Redis gives every user and ad the
counts an independent computation over the delivered records gives (repeats, late and out-of-order
deliveries and malformed records included), readable through Feast's ``get_online_features``."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import orjson
import pandas as pd
from aiokafka.structs import ConsumerRecord

from batch_jobs import realtime_log
from feature_repo.store import feature_store
from infra.redis_server import RedisServer
from infra.settings import Settings, get_settings
from infra.topics import group_lag, read_topic
from label_joiner.worker import start_worker, stop_worker
from schemas.codec import InvalidEvent
from schemas.events import Click, Impression
from schemas.fast import FastDecoder
from schemas.features import RECENT_ADS
from streams.engine import Outbox
from streams.realtime_features import BUCKET_MS, WINDOWS, EntityFeatures
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import send
from streams.state import MemoryStore
from tests.conftest import simulated_run

CFG = SimulatorConfig(hours=2, users=300, ads=200, impressions_per_hour=3_000, speed=0, seed=13,
                      duplicate_share=0.03, out_of_order_share=0.05, late_share=0.01, malformed_share=0.01)


class ListWriter:
    """Collects rows instead of writing Redis: for the pure-logic test of one stage."""

    def __init__(self):
        self.rows: list[dict] = []

    def write(self, table, rows):
        self.rows += rows
        return len(rows)


def record(topic: str, key: bytes, value: bytes, ts: int, offset: int) -> ConsumerRecord:
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=ts, timestamp_type=0, key=key,
                          value=value, checksum=None, serialized_key_size=len(key),
                          serialized_value_size=len(value), headers=())


def test_late_bucket_and_window_edges():
    writer = ListWriter()  # the pure part: no Redis
    stage = EntityFeatures(Settings(), 0, MemoryStore(), writer=writer)
    t0 = 1_800_000_000_000 - 1_800_000_000_000 % BUCKET_MS
    events = [(t0, "i"), (t0 + 2 * 3_600_000, "i"), (t0 + 30 * 60_000, "c"),  # a click delivered late
              (t0 + 2 * 3_600_000 - 10, "c"), (t0 - 25 * 3_600_000, "i")]  # older than 24 h: counted out
    recs = [record("e", b"ad:5", orjson.dumps({"k": k, "t": t}), t, i) for i, (t, k) in enumerate(events)]
    stage.process(recs, Outbox())
    row = writer.rows[-1]
    assert row["ad_impressions_1h"] == 1 and row["ad_clicks_1h"] == 1
    assert row["ad_impressions_6h"] == 2 and row["ad_clicks_6h"] == 2
    assert stage.counts["too late"] == 1


def oracle(settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Valid impressions and first clicks per impression, decoded from the topics independently."""
    frames = []
    for topic, cls in ((settings.topics.impressions, Impression), (settings.topics.clicks, Click)):
        dec, rows = FastDecoder(cls), []
        for r in read_topic(settings, topic):
            try:
                rows.append(dec.decode_dict(r.value, r.headers))
            except InvalidEvent:
                pass
        frames.append(pd.DataFrame(rows))
    imps = frames[0].drop_duplicates("impression_id")
    clicks = frames[1].drop_duplicates("impression_id")
    return imps, clicks


def expected_counts(imps: pd.DataFrame, clicks: pd.DataFrame, key: str) -> pd.DataFrame:
    events = pd.concat([imps[[key, "event_time_ms"]].assign(k="i"), clicks[[key, "event_time_ms"]].assign(k="c")])
    newest = events.groupby(key)["event_time_ms"].transform("max")
    bucket = events["event_time_ms"] - events["event_time_ms"] % BUCKET_MS
    out = {}
    for name, span in WINDOWS.items():
        inside = bucket + BUCKET_MS > newest - span
        out[f"impressions_{name}"] = (inside & (events["k"] == "i")).groupby(events[key]).sum()
        out[f"clicks_{name}"] = (inside & (events["k"] == "c")).groupby(events[key]).sum()
    return pd.DataFrame(out)


def run_worker_until_caught_up(settings: Settings, tmp_path,
                               mid_run: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run the worker until both stages are done; return how many times it was started. ``mid_run(worker)`` is
    called once, when stage 2 has begun writing; a worker that exits after it is started again (a supervisor's
    restart)."""
    group = f"rt-{uuid.uuid4().hex[:6]}"
    logs = iter(tmp_path / f"worker.{i}.log" for i in range(100))
    log = next(logs)
    proc = start_worker(settings, group, log, app_module="streams.realtime_app")
    settle_until, starts = 0.0, 1
    try:
        deadline, last = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            a = group_lag(settings, f"{group}-fanout", [settings.topics.impressions, settings.topics.clicks])
            b = group_lag(settings, f"{group}-entities", [settings.topics.realtime_entity_events])
            if mid_run is not None and b[0] > 0:
                mid_run(proc)
                # A worker retrying its writes commits nothing for a while: not "done" yet.
                mid_run, last, settle_until = None, None, time.monotonic() + 20
                continue
            # Stage 2's input is transactional: its end offsets also count commit markers, which a committed
            # offset can stop short of. Done: stage 1 caught up, and stage 2's commits no longer moving.
            if a[0] == a[1] and b[0] > 0 and b == last and mid_run is None and time.monotonic() > settle_until:
                break
            last = b
            if proc.poll() is not None:
                assert settle_until > 0, log.read_text()[-3000:]
                log = next(logs)
                proc = start_worker(settings, group, log, app_module="streams.realtime_app")
                starts += 1
            time.sleep(3)
        else:
            raise AssertionError(f"worker did not catch up: {a} {b}")
    finally:
        stop_worker(proc)
    return starts


def check_against_an_independent_count(settings: Settings) -> None:
    """The online rows (read through Feast), the recent-ads history and the offline log, against the topics."""
    imps, clicks = oracle(settings)
    store = feature_store(settings, "redis")
    for kind, view in (("user", "user_realtime"), ("ad", "ad_realtime")):
        want = expected_counts(imps, clicks, f"{kind}_id")
        ids = [int(i) for i in want.index]
        got = store.get_online_features(features=[f"{view}:{kind}_{c}" for c in want.columns],
                                        entity_rows=[{f"{kind}_id": i} for i in ids]).to_dict()
        got = pd.DataFrame({c: got[f"{kind}_{c}"] for c in want.columns}, index=want.index)
        pd.testing.assert_frame_equal(got, want, check_dtype=False, check_names=False)

    # Fatigue: the ads each user saw last, newest first, with when.
    top = imps.sort_values("event_time_ms", ascending=False).groupby("user_id").head(RECENT_ADS)
    users = [int(u) for u in imps["user_id"].value_counts().index[:20]]
    got = store.get_online_features(features=["user_realtime:user_recent_ad_ids", "user_realtime:user_recent_seen_ms"],
                                    entity_rows=[{"user_id": u} for u in users]).to_dict()
    for u, ads, seen in zip(users, got["user_recent_ad_ids"], got["user_recent_seen_ms"], strict=True):
        mine = top[top["user_id"] == u]
        assert seen == sorted(mine["event_time_ms"].tolist(), reverse=True)
        cut = seen[-1]
        firm = mine[mine["event_time_ms"] > cut]  # ties at the cut may keep either ad
        assert Counter(a for a, s in zip(ads, seen, strict=True) if s > cut) == Counter(firm["ad_id"].tolist())

    # The offline log: every row the worker wrote lands once in its view's Delta table; a re-run adds nothing.
    landed = realtime_log.run(None, settings)
    logged = read_topic(settings, settings.topics.realtime_features)
    per_view = Counter(dict(r.headers)["view"].decode() for r in logged)
    assert landed == {view: per_view[view] for view in landed} and sum(landed.values()) > 0
    assert realtime_log.run(None, settings) == {view: 0 for view in landed}


def test_worker_features_equal_an_independent_count(fresh_topics, tmp_path):
    settings, gen = simulated_run(fresh_topics, tmp_path, CFG)
    settings = settings.model_copy(update={"feast_project": f"t{uuid.uuid4().hex[:8]}"})
    assert gen.truth["impression_duplicated"].sum() > 0 and gen.truth["impression_malformed"].sum() > 0
    run_worker_until_caught_up(settings, tmp_path)
    check_against_an_independent_count(settings)


def test_redis_restart_mid_run_loses_nothing(fresh_topics, tmp_path):
    """Half the events are in when Redis stops; the other half arrive while it is down, and it starts again:
    the rows, the history and the log still equal the count (``make chaos`` restarts Redis under the whole
    pipeline; this is the part CI runs)."""
    settings, gen = simulated_run(fresh_topics, tmp_path, CFG, send_it=False)
    settings = settings.model_copy(update={"feast_project": f"t{uuid.uuid4().hex[:8]}"})
    half = len(gen.schedule.kind) // 2
    first, second = (replace(gen.schedule, kind=gen.schedule.kind[s], row=gen.schedule.row[s],
                             delivery_ms=gen.schedule.delivery_ms[s], corruption=gen.schedule.corruption[s])
                     for s in (slice(None, half), slice(half, None)))
    send(first, settings, speed=0, start_ms=CFG.start_ms)
    redis = RedisServer(get_settings())  # the shared server (the run's settings point var_dir elsewhere)

    def outage(worker: subprocess.Popen) -> None:
        redis.stop()
        try:
            send(second, settings, speed=0, start_ms=CFG.start_ms)
            # Down until the worker has read the second half, failed its writes and exited (a fixed 5 s was too
            # short for a loaded machine: the worker had not tried yet, and the test never met the outage).
            deadline = time.monotonic() + 90
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            redis.start()

    starts = run_worker_until_caught_up(settings, tmp_path, mid_run=outage)
    # The outage hit the worker with writes to make: it failed them, exited and was started again.
    assert starts >= 2, "the worker never met the outage"
    check_against_an_independent_count(settings)
