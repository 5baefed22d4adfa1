"""The simulator's ad server in the closed loop: policies shape the data, budgets are paced, replays repeat."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from infra.settings import get_settings
from streams.simulator.closed_loop import ClosedLoop, Pacer, baseline_policy, random_policy
from streams.simulator.config import SimulatorConfig

CFG = SimulatorConfig(seed=3, start=datetime(2026, 11, 20, tzinfo=UTC), hours=4, users=5_000, ads=1_000,
                      impressions_per_hour=1_500)


def test_a_better_policy_earns_more_clicks_on_the_same_requests():
    settings = get_settings()
    smart = ClosedLoop(CFG, settings, candidates=100).serve_hour(1, baseline_policy(ClosedLoop(CFG, settings, 100)))
    dumb = ClosedLoop(CFG, settings, candidates=100).serve_hour(1, random_policy)
    assert set(smart["request_id"]) == set(dumb["request_id"])  # the same requests, other choices
    # Random serving is calibrated to the configured CTR; ranking by (noisy) truth shows far better ads.
    assert abs(dumb["true_pctr"].mean() - CFG.ctr) < 0.015
    assert smart["true_pctr"].mean() > 2 * dumb["true_pctr"].mean()
    assert (smart["position"] < smart.groupby("request_id")["position"].transform("size")).all()


def test_same_seed_same_hour_same_truth():
    settings = get_settings()
    a = ClosedLoop(CFG, settings, candidates=50)
    b = ClosedLoop(CFG, settings, candidates=50)
    ta, tb = a.serve_hour(2, random_policy), b.serve_hour(2, random_policy)
    assert ta[["impression_id", "ad_id", "clicked", "converts"]].equals(tb[["impression_id", "ad_id", "clicked",
                                                                             "converts"]])


def test_deliveries_wait_for_their_time_and_carry_the_models_version():
    settings = get_settings()
    loop = ClosedLoop(CFG, settings, candidates=50)
    truth = loop.serve_hour(0, random_policy)
    loop.deliveries(0, truth)
    end = CFG.start_ms + 3_600_000
    due = loop.due(end)
    assert due and all(d[0] < end for d in due)
    assert all(d[0] >= end for d in loop.pending)  # conversions days later (and late events) wait
    impressions = [d[3] for d in due if d[1] == settings.topics.impressions and b"model_version" in d[3]]
    assert impressions and all(b"sim-serving-v1" in v for v in impressions)


def test_pacing_holds_back_a_campaign_that_spends_ahead_and_closes_it_when_spent():
    pacer = Pacer(np.array([100.0, 100.0]), step_s=60)
    day = 20_000 * 86_400_000
    pacer.at(day)
    pacer.charge(0, 60.0, day + 1)  # 60 % of the budget in the first hours
    for minute in range(1, 240):
        pacer.at(day + 6 * 3_600_000 + minute * 60_000)
    assert pacer.rate[0] < 0.1 and pacer.rate[1] == 1.0
    pacer.charge(0, 50.0, day + 7 * 3_600_000)
    rng = np.random.default_rng(0)
    assert not pacer.eligible(np.array([0] * 100), rng).any()
    pacer.at(day + 86_400_000)  # the next UTC day: budgets and rates reset
    assert pacer.eligible(np.array([0] * 100), rng).all()
