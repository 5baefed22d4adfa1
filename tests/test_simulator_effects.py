"""The simulator's effects that features can see (``SimulatorConfig.effects``): each one is in the truth with
its configured size, the sequential ones agree with the outcomes the run recorded, and a world without effects
is drawn exactly as before. Pure logic: the truth is generated in process."""

from __future__ import annotations

import hashlib
from datetime import datetime

import numpy as np
import pandas as pd
from scipy.special import logit

from infra.settings import get_settings
from streams.simulator.behaviour import Behaviour
from streams.simulator.closed_loop import ClosedLoop, random_policy
from streams.simulator.config import Effects, SimulatorConfig
from streams.simulator.run import generate
from streams.simulator.world import build_world

START = datetime.fromisoformat("2026-10-01T00:00:00+00:00")
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
CHECKSUM_BEFORE_EFFECTS = "e2dcc728cfc3fb7c3dc090758a0055d6296d678f33cead1659e676165b50a598"
BASE = SimulatorConfig(seed=5, start=START, hours=50, users=1_500, ads=200, impressions_per_hour=2_000, ctr=0.05,
                       cvr=0.2, speed=0, prediction_log=False)


def truth(effects: Effects) -> pd.DataFrame:
    return generate(BASE.model_copy(update={"effects": effects}), get_settings()).truth


def constant(values: np.ndarray) -> bool:
    """The values differ by a constant (the run's offset moves with the effects) and nothing else."""
    return float(np.ptp(values)) < 1e-6


def test_a_world_without_effects_is_drawn_as_before_they_existed():
    """A checksum of a small run's truth, taken with the generator before ``effects`` existed: adding them moved no
    draw. (An intended change to the generator changes this number; say so in its commit.)"""
    cfg = SimulatorConfig(seed=3, start=START, hours=6, users=2_000, ads=300, impressions_per_hour=3_000, speed=0,
                          prediction_log=False)
    run = generate(cfg, get_settings()).truth
    columns = ["impression_id", "user_id", "ad_id", "event_time_ms", "clicked", "converts", "click_time_ms",
               "conversion_time_ms"]
    frame = run[columns].assign(true_pctr=run["true_pctr"].round(9), true_pcvr=run["true_pcvr"].round(9))
    digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()
    assert len(run) == 12_539 and digest == CHECKSUM_BEFORE_EFFECTS


def test_effects_off_is_the_latent_truth_and_each_effect_adds_its_term():
    off = truth(Effects())
    fatigue = truth(Effects(fatigue_logit=0.6))
    hour = truth(Effects(hour_logit=0.3))
    advertiser = truth(Effects(advertiser_cvr_sd=0.8))
    # Fatigue and the hour change probabilities only; the impressions themselves are the same draws.
    for run in (fatigue, hour, advertiser):
        assert run[["impression_id", "user_id", "ad_id", "event_time_ms"]].equals(
            off[["impression_id", "user_id", "ad_id", "event_time_ms"]])

    views = views_before(off)
    assert (views > 0).mean() > 0.1  # repeat views are common enough to matter
    diff = logit(fatigue["true_pctr"]) - logit(off["true_pctr"])
    assert constant(diff + 0.6 * np.log1p(views))

    hour_of_day = (off["event_time_ms"] / HOUR_MS) % 24
    diff = logit(hour["true_pctr"]) - logit(off["true_pctr"])
    assert constant(diff - 0.3 * np.cos(2 * np.pi * (hour_of_day - 20) / 24))

    world = build_world(BASE, np.random.default_rng(BASE.seed))
    diff = logit(advertiser["true_pcvr"]) - logit(off["true_pcvr"])
    assert constant(diff - 0.8 * world.advertiser_cvr_z[off["advertiser_id"]])
    # The rates stay near their targets with every effect on.
    real = truth(Effects.realistic())
    assert abs(real["clicked"].mean() / BASE.ctr - 1) < 0.1
    assert abs(real.loc[real["clicked"], "converts"].mean() / BASE.cvr - 1) < 0.1


def test_the_truth_records_the_latent_user_x_ad_part_of_each_logit():
    off = truth(Effects())
    world = build_world(BASE, np.random.default_rng(BASE.seed))
    user, ad = off["user_id"].to_numpy(), off["ad_id"].to_numpy()
    gen, slot = ad // world.n_slots, ad % world.n_slots
    assert np.allclose(off["ctr_latent_logit"], 4 * (world.user_ctr_f[user] * world.ad_ctr_f[gen, slot]).sum(1))
    assert np.allclose(off["cvr_latent_logit"], 4 * (world.user_cvr_f[user] * world.ad_cvr_f[gen, slot]).sum(1))
    assert off["ctr_latent_logit"].std() > 1.0  # the largest single part of the click logit


def recency_from_clicks(run: pd.DataFrame, half_life_h: float = 6.0) -> np.ndarray:
    """2^(-hours since the newest click, on an impression of an earlier hour, by the user in the row's category /
    half life), from the outcomes ``run`` recorded (rows in time order)."""
    hour_start = (run["event_time_ms"] - BASE.start_ms) // HOUR_MS * HOUR_MS + BASE.start_ms
    clicks = run[run["clicked"]]
    out = np.zeros(len(run))
    for (user, category), rows in run.groupby(["user_id", "category_id"]).groups.items():
        mine = clicks[(clicks["user_id"] == user) & (clicks["category_id"] == category)]
        if len(mine) == 0:
            continue
        shown, last_click = mine["event_time_ms"].to_numpy(), np.maximum.accumulate(mine["click_time_ms"].to_numpy())
        k = np.searchsorted(shown, hour_start[rows].to_numpy(), side="left")
        last = last_click[np.maximum(k - 1, 0)]
        since_h = np.maximum(run.loc[rows, "event_time_ms"].to_numpy() - last, 0) / HOUR_MS
        out[run.index.get_indexer(rows)] = np.where(k > 0, np.exp2(-since_h / half_life_h), 0.0)
    return out


def views_before(run: pd.DataFrame) -> np.ndarray:
    """Earlier views of the same ad by the same user that UTC day (rows in time order)."""
    day = (run["event_time_ms"] - BASE.start_ms) // DAY_MS
    return run.groupby([day, run["user_id"], run["ad_id"]]).cumcount().to_numpy()


def test_the_closed_loop_draws_the_same_sequential_truth():
    """The closed loop's ad server shows the same ads with or without the effects (budgets too large to bind);
    the truth of what it showed carries fatigue and recency from what it recorded."""
    cfg = BASE.model_copy(update={"hours": 4.0})
    served = {}
    for name, effects in (("off", Effects()), ("on", Effects(fatigue_logit=0.6, recency_logit=1.0))):
        loop = ClosedLoop(cfg.model_copy(update={"effects": effects}), get_settings(), candidates=20,
                          budget_scale=1e6)
        served[name] = pd.concat([loop.serve_hour(h, random_policy) for h in range(4)], ignore_index=True)
    off, on = served["off"], served["on"]
    assert on["impression_id"].equals(off["impression_id"]) and len(on) > 5_000
    expected = -0.6 * np.log1p(views_before(on)) + recency_from_clicks(on)
    assert (views_before(on) > 0).any() and (recency_from_clicks(on) > 0).any()
    assert np.allclose(logit(on["true_pctr"]) - logit(off["true_pctr"]), expected, atol=1e-9)


def test_sequential_effects_agree_with_the_recorded_outcomes():
    """Recency and converters are recomputed from the clicks and conversions the run recorded (as of each
    impression's hour): the truth used exactly the outcomes it reports."""
    off = truth(Effects())
    on = truth(Effects(recency_logit=1.0, converter_logit=0.5))
    assert not on["clicked"].equals(off["clicked"])  # the effects changed who clicked
    hour_start = (on["event_time_ms"] - BASE.start_ms) // HOUR_MS * HOUR_MS + BASE.start_ms
    conversions = on[on["converts"]]
    recency = recency_from_clicks(on)
    converter = np.zeros(len(on))
    for user, rows in on.groupby("user_id").groups.items():
        times = np.sort(conversions.loc[conversions["user_id"] == user, "conversion_time_ms"].to_numpy())
        before = np.searchsorted(times, hour_start[rows].to_numpy(), side="right")
        converter[on.index.get_indexer(rows)] = np.log1p(before)
    assert (recency > 0.1).mean() > 0.02 and (converter > 0).mean() > 0.01
    assert constant(logit(on["true_pctr"]) - logit(off["true_pctr"]) - recency)
    assert constant(logit(on["true_pcvr"]) - logit(off["true_pcvr"]) - 0.5 * converter)


def test_behaviour_counts_views_per_day_and_conversions_when_they_happen():
    cfg = BASE.model_copy(update={"effects": Effects(fatigue_logit=1.0, converter_logit=1.0)})
    b = Behaviour(cfg, users=3)
    t0 = cfg.start_ms
    user, ad, cat = np.array([0, 0]), np.array([9, 9]), np.array([1, 1])
    b.observe(user, ad, cat, np.array([t0, t0 + 1]), np.array([False, False]), np.zeros(2, np.int64),
              np.array([True, False]), np.array([t0 + 5 * HOUR_MS, -1]))
    # Two views today: the next one counts both; tomorrow starts over.
    assert np.allclose(b.ctr_logit(np.array([0]), np.array([9]), np.array([1]), np.array([t0 + 2])), -np.log(3))
    assert b.ctr_logit(np.array([0]), np.array([9]), np.array([1]), np.array([t0 + DAY_MS]))[0] == 0.0
    b.advance(t0 + 5 * HOUR_MS - 1)
    assert b.cvr_logit(np.array([0]))[0] == 0.0  # the conversion has not happened yet
    b.advance(t0 + 5 * HOUR_MS)
    assert np.isclose(b.cvr_logit(np.array([0]))[0], np.log(2))
