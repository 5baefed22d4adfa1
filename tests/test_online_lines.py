"""One model line across the cadences, on the real broker and registry: the online trainer branches off the newest
promoted batch model at the offsets where that model's data ended, a newer batch model starts a new line, a
rolled-back line is never promoted again, the daily warm start continues from the batch spine, and online
promotion is gated on progressive validation."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import torch

from infra.settings import TrainerSettings
from label_joiner.schemes import example
from schemas.events import TrainingExample
from tests.test_online_trainer import produce
from trainers import warm_start
from trainers.data import InputSpec, encode
from trainers.model import Ranker
from trainers.online import DAY_MS, Line, OnlineLearner, incumbent_of, run
from trainers.registry import Registry, RegistryError
from trainers.scoring import ScoringModel, save

DAY0 = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
SMALL = TrainerSettings(id_buckets=1009, small_buckets=101, embedding_dim=8, online_gate_min_examples=10,
                        online_gate_margin=1.0, online_batch_size=32)


def day_examples(day: int, n: int) -> list[TrainingExample]:
    """n impressions on ``DAYS[day]``: every third one clicked (an fnw click example), the rest not."""
    out = []
    for i in range(n):
        t = DAY0 + day * DAY_MS + 3_600_000 + i * 1000
        b = {"impression_id": f"d{day}-{i}", "user_id": i % 7, "ad_id": i % 11, "advertiser_id": i % 3,
             "campaign_id": i % 5, "placement": "feed", "position": 0, "device": "ios", "model_version": "m",
             "impression_time_ms": t, "click_time_ms": t + 2000, "conversion_time_ms": None}
        clicked = i % 3 == 0
        kind = f"click/c{i}" if clicked else "noclick"
        out.append(TrainingExample(**example(b, "fnw", kind, clicked=clicked, converted=False, label_ctcvr=0.0,
                                             as_of_ms=t + 2000 if clicked else t + 30_000)))
    return out


def batch_model(registry: Registry, spec: InputSpec, cadence: str, days: list[str], parent: str | None) -> str:
    version = save(registry, ScoringModel(Ranker.from_settings(spec, SMALL), negative_rate=0.5), cadence,
                   {"data_range": days, "parent": parent, "feature_service": {"name": "ranker",
                                                                               "spec": spec.fingerprint()}})
    registry.promote(version, reason=f"test: {cadence}")
    return version


def first_of(registry: Registry, versions: list[str]) -> dict:
    return registry.meta(versions[0])


def test_online_lines_follow_the_batch_spine_and_never_revive_a_rollback(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path, "trainer": SMALL})
    registry = Registry(settings.registry_dir)
    spec = InputSpec.from_schemas(SMALL.id_buckets, SMALL.small_buckets)
    full = batch_model(registry, spec, "full", DAYS[:1], None)
    produce(settings, day_examples(0, 30) + day_examples(1, 40))

    # A line off the full retrain: day 0 is the full retrain's data, skipped; day 1 is learned.
    line1 = run(settings, scheme="fnw", publish_every_s=2.0, idle_exit_s=5.0, features=False)
    meta = registry.meta(line1[-1])
    assert first_of(registry, line1)["parent"] == full and meta["line_root"] == full
    assert meta["counts"]["in_batch_data"] == 30 and meta["counts"]["learned"] == 40, meta["counts"]
    assert DAY0 + DAY_MS <= meta["learned_range"][0] <= meta["learned_range"][1] < DAY0 + 2 * DAY_MS
    assert meta["gate"]["passed"] and registry.promoted() == line1[-1]
    assert warm_start.seen_days(meta) == DAYS[:2]  # a warm start from this version would refuse day 1

    # The daily warm start continues from the batch head, not from the promoted online version.
    assert warm_start.parent_of_warm_start(registry).version == full
    warm = batch_model(registry, spec, "warm", DAYS[:2], full)
    assert registry.batch_head() == warm
    produce(settings, day_examples(2, 50))

    # A new line off the warm start, starting at the offsets where its data ended: nothing of days 0-1 is read.
    line2 = run(settings, scheme="fnw", publish_every_s=2.0, idle_exit_s=5.0, features=False)
    meta2 = registry.meta(line2[-1])
    assert first_of(registry, line2)["parent"] == warm and meta2["line_root"] == warm
    assert meta2["line"] != meta["line"]
    assert meta2["counts"].get("in_batch_data", 0) == 0 and meta2["counts"]["learned"] == 50, meta2["counts"]
    started = [e for e in registry.lineage_events() if e["event"] == "line" and e["line"] == meta2["line"]]
    assert started and sum(started[0]["offsets"].values()) == 70  # the first offset of day 2 (one partition)

    # The breaker rolls the line back: the whole line is tainted, the rollback lands on the warm start.
    assert registry.promoted() == line2[-1]
    assert registry.rollback("test: the online line misbehaved") == warm
    with pytest.raises(RegistryError, match="rolled back"):
        registry.promote(line2[0])

    # The next run starts a fresh line off the warm start and learns day 2 again, into a new model.
    line3 = run(settings, scheme="fnw", publish_every_s=2.0, idle_exit_s=5.0, features=False)
    meta3 = registry.meta(line3[-1])
    assert first_of(registry, line3)["parent"] == warm and meta3["line"] not in (meta["line"], meta2["line"])
    assert meta3["counts"]["learned"] == 50, meta3["counts"]
    assert registry.promoted() == line3[-1]

    # A rolled-back batch model ends the spine there: the head falls back to its parent.
    registry.promote(warm, reason="test")
    registry.rollback("test: the warm start was bad")
    assert registry.batch_head() == full
    with pytest.raises(RegistryError, match="rolled back"):
        registry.promote(line3[-1])  # descends from the rolled-back warm start


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": rng.integers(0, 50, n), "ad_id": rng.integers(0, 20, n),
                         "advertiser_id": 1, "campaign_id": 1, "category_id": 2, "placement": "feed",
                         "device": "ios", "position": 0, "label_ctr": (rng.random(n) < 0.05).astype(float),
                         "label_ctcvr": 0.0, "weight": 1.0})


def test_the_gate_promotes_only_a_line_no_worse_than_the_promoted_model():
    spec = InputSpec.from_schemas(SMALL.id_buckets, SMALL.small_buckets)
    cfg = SMALL.model_copy(update={"online_gate_margin": 0.01, "online_gate_min_examples": 200})
    good = Ranker.from_settings(spec, cfg)
    good.shift_ctr_logit(-3.0)  # near the 5 % click rate
    broken = Ranker.from_settings(spec, cfg)
    broken.load_state_dict(good.state_dict())
    broken.shift_ctr_logit(3.0)

    learner = OnlineLearner(good, cfg, torch.device("cpu"), "naive")
    learner.set_incumbent(broken, "v-broken")
    learner.learn(encode(_frame(100, 1), spec))
    assert learner.gate()["passed"] is False and "not enough" in learner.gate()["why"]
    for seed in range(2, 6):
        learner.learn(encode(_frame(100, seed), spec))
    gate = learner.gate()
    assert gate["passed"] and gate["line_logloss"] < gate["incumbent_logloss"], gate

    # The other way round: a line worse than the promoted model is not promoted.
    worse = OnlineLearner(broken, cfg, torch.device("cpu"), "naive")
    worse.set_incumbent(good, "v-good")
    for seed in range(2, 6):
        worse.learn(encode(_frame(100, seed), spec))
    gate = worse.gate()
    assert not gate["passed"] and gate["line_logloss"] > gate["incumbent_logloss"], gate


def test_the_line_s_own_promotion_keeps_the_reference_and_its_window():
    """After the line promotes its own version the gate still compares the line to the model it began against,
    over the same sliding window, so the next publication need not wait for ``online_gate_min_examples`` new
    examples (at the live rate, 500 examples are ~83 s). With no reference, the first version becomes it."""
    spec = InputSpec.from_schemas(SMALL.id_buckets, SMALL.small_buckets)
    cfg = SMALL.model_copy(update={"online_gate_margin": 0.01, "online_gate_min_examples": 200})
    good = Ranker.from_settings(spec, cfg)
    good.shift_ctr_logit(-3.0)
    root = Ranker.from_settings(spec, cfg)
    root.load_state_dict(good.state_dict())
    root.shift_ctr_logit(3.0)

    learner = OnlineLearner(good, cfg, torch.device("cpu"), "naive")
    learner.set_incumbent(root, "v-root")
    for seed in range(2, 5):
        learner.learn(encode(_frame(100, seed), spec))
    assert learner.gate()["passed"]
    learner.promoted_own("v-online-1")
    learner.learn(encode(_frame(20, 9), spec))  # a few new examples only
    gate = learner.gate()
    assert gate["against"] == "v-root" and gate["examples"] == 320 and gate["passed"], gate

    fresh = OnlineLearner(good, cfg, torch.device("cpu"), "naive")
    assert fresh.gate()["passed"] and "nothing promoted" in fresh.gate()["why"]
    fresh.promoted_own("v-first")
    fresh.learn(encode(_frame(100, 3), spec))
    gate = fresh.gate()
    assert gate["against"] == "v-first" and not gate["passed"] and "not enough" in gate["why"], gate


def test_a_restarted_line_judges_against_the_reference_its_newest_version_was_judged_against(tmp_path):
    """After a restart the promoted version is the line's own newest one; the gate's reference is recovered from
    that version's ``meta["gate"]["against"]`` (the batch root here), unless that version was rolled back."""
    registry = Registry(tmp_path / "registry")
    spec = InputSpec.from_schemas(SMALL.id_buckets, SMALL.small_buckets)
    root = batch_model(registry, spec, "full", DAYS[:1], None)
    online = save(registry, ScoringModel(Ranker.from_settings(spec, SMALL)), "online",
                  {"line": f"{root}~1", "line_root": root, "gate": {"against": root, "passed": True},
                   "feature_service": {"name": "ranker", "spec": spec.fingerprint()}})
    registry.promote(online, reason="test: the line's own version")
    line = Line(Ranker.from_settings(spec, SMALL), root, online, f"{root}~1", {}, 0, None)
    model, version = incumbent_of(registry, line)
    assert version == root and model is not None
    # Without a line (or for another line's version) the reference is the promoted version itself.
    assert incumbent_of(registry)[1] == online
    # A reference that was rolled back is not recovered: the promoted version itself is the reference.
    bad = batch_model(registry, spec, "warm", DAYS[:2], root)
    registry.rollback("test: the warm start was bad")
    assert registry.tainted(bad) == bad
    judged = save(registry, ScoringModel(Ranker.from_settings(spec, SMALL)), "online",
                  {"line": f"{root}~2", "line_root": root, "gate": {"against": bad, "passed": True},
                   "feature_service": {"name": "ranker", "spec": spec.fingerprint()}})
    registry.promote(judged, reason="test: a version judged against the rolled-back one")
    line2 = Line(Ranker.from_settings(spec, SMALL), root, judged, f"{root}~2", {}, 0, None)
    assert incumbent_of(registry, line2)[1] == judged
