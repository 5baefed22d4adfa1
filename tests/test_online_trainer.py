"""The online trainer against the real broker and registry: repeats dropped, bad records dead-lettered, offsets
stored with the model they produced, and a restart that neither skips nor learns anything twice."""

from __future__ import annotations

import json

from kafka import KafkaProducer

from label_joiner.schemes import example
from schemas.codec import encode as encode_event
from schemas.events import TrainingExample
from trainers.online import ExampleState, run, to_rows
from trainers.registry import Registry


def _base(i: int) -> dict:
    return {"impression_id": f"imp{i}", "user_id": i % 7, "ad_id": i % 11, "advertiser_id": i % 3, "campaign_id": i % 5,
            "placement": "feed", "position": i % 4, "device": "ios", "model_version": "m0",
            "impression_time_ms": 1_700_000_000_000 + i * 1000, "click_time_ms": 1_700_000_000_000 + i * 1000 + 3000,
            "conversion_time_ms": 1_700_000_000_000 + i * 1000 + 60_000}


def examples_for(i: int) -> list[TrainingExample]:
    """What the joiner's fnw scheme emits for impression i: a no-click, or a click (fake negative) and, for
    every third click, its conversion."""
    b = _base(i)
    if i % 2:
        return [TrainingExample(**example(b, "fnw", "noclick", clicked=False, converted=False, label_ctcvr=0.0,
                                          as_of_ms=b["impression_time_ms"] + 30_000))]
    out = [TrainingExample(**example(b, "fnw", f"click/c{i}", clicked=True, converted=False, label_ctcvr=0.0,
                                     as_of_ms=b["click_time_ms"]))]
    if i % 3 == 0:
        out.append(TrainingExample(**example(b, "fnw", f"conversion/v{i}", clicked=True, converted=True,
                                             label_ctcvr=1.0, as_of_ms=b["conversion_time_ms"])))
    return out


def produce(settings, events: list[TrainingExample], raw: list[bytes] = ()) -> None:
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for ev in events:
        key, value, headers = encode_event(ev)
        producer.send(settings.topics.training_examples, key=key, value=value, headers=headers)
    for value in raw:
        producer.send(settings.topics.training_examples, key=b"bad", value=value)
    producer.flush()
    producer.close()


def test_online_trainer_publishes_offsets_drops_repeats_and_resumes(fresh_topics, tmp_path):
    # A gate this loose always passes (the gate itself: tests/test_online_lines.py): every publication registers.
    trainer = fresh_topics.trainer.model_copy(update={"online_gate_min_examples": 10, "online_gate_margin": 1.0})
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path, "trainer": trainer})
    first = [ex for i in range(60) for ex in examples_for(i)]
    repeats = first[:15]  # the joiner replayed after a restart: same example ids
    produce(settings, first + repeats, raw=[b"{not json"])

    versions = run(settings, scheme="fnw", publish_every_s=2.0, idle_exit_s=6.0, features=False)
    assert versions, "the trainer published no version"
    registry = Registry(settings.registry_dir)
    meta = registry.load(versions[-1])[1]
    assert registry.promoted() == versions[-1]
    counts = meta["counts"]
    assert counts["learned"] == len(first) and counts["repeats"] == len(repeats), counts
    assert counts["dead_letters"] == 1, counts
    total = len(first) + len(repeats) + 1
    assert sum(meta["kafka_offsets"].values()) == total, meta["kafka_offsets"]
    assert meta["examples"] > 0 and meta["freshness_s"]["n"] > 0
    # The checkpointed positions are also committed to the monitoring group: its lag is 0.
    from infra.topics import group_lag

    assert group_lag(settings, settings.trainer.online_group_id, [settings.topics.training_examples]) == (total, total)

    # A restart with no new input: resumes at the stored offsets, learns nothing, publishes nothing.
    assert run(settings, scheme="fnw", publish_every_s=1.0, idle_exit_s=4.0, features=False) == []

    # New examples after the restart: only those are learned, and the new version names its parent.
    more = [ex for i in range(60, 90) for ex in examples_for(i)]
    produce(settings, more + first[:5])  # plus five more repeats of old examples
    again = run(settings, scheme="fnw", publish_every_s=30.0, idle_exit_s=6.0, features=False)
    assert len(again) == 1
    meta2 = registry.load(again[0])[1]
    assert meta2["parent"] == versions[-1]
    assert meta2["steps"] > meta["steps"], (meta["steps"], meta2["steps"])  # Adam state and schedule continued
    assert meta2["counts"]["learned"] == len(more) and meta2["counts"]["repeats"] == 5, meta2["counts"]
    assert sum(meta2["kafka_offsets"].values()) == total + len(more) + 5
    json.dumps(meta2)


def test_fnw_conversion_rows_do_not_count_their_click_twice_and_corrections_supersede():
    state = ExampleState()
    b = _base(0)
    click = TrainingExample(**example(b, "naive", "click/c0", clicked=True, converted=False, label_ctcvr=0.0,
                                      as_of_ms=b["click_time_ms"]))
    conv = TrainingExample(**example(b, "naive", "conversion/v0", clicked=True, converted=True, label_ctcvr=1.0,
                                     as_of_ms=b["conversion_time_ms"], is_correction=True))
    first = to_rows([((0, 0), click)], state, "naive").rows
    rows = to_rows([((0, 1), conv)], state, "naive").rows
    # naive: the conversion supersedes the click's negative learned earlier: it is taken back (weight -1), then
    # the positive is learned.
    assert [(r["label_ctcvr"], r["weight"]) for r in first + rows] == [(0.0, 1.0), (0.0, -1.0), (1.0, 1.0)]
    # Both in one input batch: the superseded row is dropped before learning (the pair never reaches the loss
    # or its normaliser), only the positive is learned.
    both = to_rows([((0, 0), click), ((0, 1), conv)], ExampleState(), "naive", cancel=True)
    assert [(r["label_ctcvr"], r["weight"]) for r in both.rows] == [(1.0, 1.0)]
    assert both.counts["superseded"] == both.counts["cancelled"] == 1

    state = ExampleState()
    fnw_conv = conv.model_copy(update={"scheme": "fnw", "is_correction": False})
    rows = to_rows([((0, 0), click), ((0, 1), fnw_conv)], state, "fnw").rows
    assert [(r["label_ctcvr"], r["weight"], r["ctr_weight"]) for r in rows] == [(0.0, 1.0, 1.0), (1.0, 1.0, 0.0)]

    # A re-read of the same positions after a restart is learned again (its model was never published); the
    # same example at another position is a repeat.
    again = to_rows([((0, 0), click), ((0, 1), fnw_conv), ((0, 7), click)], state, "fnw")
    assert again.counts["learned"] == 2 and again.counts["repeats"] == 1
    assert [r["ctr_weight"] for r in again.rows] == [1.0, 0.0]


def _day_examples(day: int, n: int, partition: int) -> list[tuple[tuple[int, int], TrainingExample]]:
    """n no-click examples of impressions on simulated day ``day``, at offsets of ``partition``."""
    out = []
    for i in range(n):
        b = {**_base(i), "impression_id": f"d{day}p{partition}i{i}",
             "impression_time_ms": 1_700_000_000_000 + day * 86_400_000 + i * 1000}
        ex = TrainingExample(**example(b, "fnw", "noclick", clicked=False, converted=False, label_ctcvr=0.0,
                                       as_of_ms=b["impression_time_ms"] + 30_000))
        out.append(((partition, day * 1000 + i), ex))
    return out


def test_example_state_is_bounded_by_the_windows_and_not_moved_by_one_partition(tmp_path):
    """30 days of examples: the RocksDB state keeps only the days an example may still come for; a repeat inside
    that span is still dropped; a partition far ahead does not expire what the others still need."""
    retention_ms = 3 * 86_400_000
    state = ExampleState(tmp_path / "state", retention_ms=retention_ms)
    sizes = []
    for day in range(30):
        batch = _day_examples(day, 50, 0) + _day_examples(day, 50, 1)
        to_rows(batch, state, "fnw")
        state.expire([(p, o, ex.impression_time_ms) for (p, o), ex in batch])
        sizes.append(state.live_keys())
    # Two keys per impression (e: and i:); days d-3..d survive (a day goes once it ended retention before the clock).
    assert max(sizes) == sizes[-1] == sizes[10] == 2 * 100 * 4, sizes
    assert state.expired == 2 * 100 * 30 - sizes[-1]
    # A replay of yesterday's examples at other offsets: repeats, not learned twice.
    replay = [((p, o + 10**6), ex) for (p, o), ex in _day_examples(28, 50, 0)]
    assert to_rows(replay, state, "fnw").counts["repeats"] == 50
    state.close()

    # Reopened: the clock and the index survive a restart.
    state = ExampleState(tmp_path / "state", retention_ms=retention_ms)
    assert state.live_keys() == sizes[-1]
    # One partition jumps 100 days ahead (a skewed producer upstream): the clock is the slowest partition's.
    skewed = _day_examples(130, 5, 0)
    to_rows(skewed, state, "fnw")
    assert state.expire([(p, o, ex.impression_time_ms) for (p, o), ex in skewed]) == 0
    assert to_rows([((1, 5 * 10**6), ex) for _, ex in _day_examples(29, 50, 1)], state, "fnw").counts["repeats"] == 50
    state.close()
