"""Impressions and their true outcomes: true pCTR / pCVR, click and conversion delays.

Everything is drawn at once with numpy for the whole run (deterministic for a seed); the result is the
ground truth, one row per impression.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit

from streams.simulator.behaviour import Behaviour
from streams.simulator.config import SimulatorConfig
from streams.simulator.world import (
    DEVICE_LOGIT,
    DEVICE_P,
    DEVICES,
    PLACEMENT_LOGIT,
    PLACEMENT_P,
    PLACEMENTS,
    POSITION_LOGIT_PER_SLOT,
    World,
)

MAX_SLOTS = 4  # ads per request


def solve_offset(logits: np.ndarray, target_mean: float) -> float:
    """The constant ``b`` with mean(sigmoid(logits + b)) == target_mean (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expit(logits + mid).mean() < target_mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _request_times(cfg: SimulatorConfig, rng: np.random.Generator, mean_slots: float) -> np.ndarray:
    """Request times (ms) with a diurnal rate; Poisson counts per simulated minute."""
    minutes = int(np.ceil(cfg.hours * 60))
    minute_start = cfg.start_ms + np.arange(minutes) * 60_000
    hour_of_day = (minute_start / 3_600_000.0) % 24
    rate = cfg.impressions_per_hour / 60.0 / mean_slots
    rate = rate * (1 + cfg.diurnal_amplitude * np.sin(2 * np.pi * (hour_of_day - 9) / 24))
    counts = rng.poisson(rate)
    times = np.repeat(minute_start, counts) + rng.integers(0, 60_000, counts.sum())
    times = np.sort(times[times < cfg.end_ms])
    return times


def conversion_delays(cfg: SimulatorConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds from click to conversion: fast exponential mass plus a lognormal tail over days."""
    fast = rng.random(n) < cfg.conv_fast_share
    return np.where(fast, rng.exponential(cfg.conv_fast_mean_s, n),
                    rng.lognormal(np.log(cfg.conv_slow_median_s), cfg.conv_slow_sigma, n))


LATENT_SCALE = 4.0  # the user x ad factors' dot product is multiplied by this in both logits


def latent_ctr_logit(world: World, user: np.ndarray, slot: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """The user x ad latent part of each impression's click logit: what no feature observes, and only ids seen
    together often enough can teach (``trainers.evaluate.oracle_without_interaction``)."""
    return LATENT_SCALE * np.einsum("ij,ij->i", world.user_ctr_f[user], world.ad_ctr_f[gen, slot])


def latent_cvr_logit(world: World, user: np.ndarray, slot: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """The user x ad latent part of each impression's conversion logit (as :func:`latent_ctr_logit`)."""
    return LATENT_SCALE * np.einsum("ij,ij->i", world.user_cvr_f[user], world.ad_cvr_f[gen, slot])


def true_ctr_logit(cfg: SimulatorConfig, world: World, user: np.ndarray, slot: np.ndarray, gen: np.ndarray,
                   place: np.ndarray, device: np.ndarray, position: np.ndarray, t_ms: np.ndarray) -> np.ndarray:
    """The click logit of each impression before the run's offset (the hidden truth)."""
    days = (t_ms - cfg.start_ms) / 86_400_000.0
    logit = (latent_ctr_logit(world, user, slot, gen) + world.ad_ctr_bias[gen, slot]
             + PLACEMENT_LOGIT[place] + DEVICE_LOGIT[device]
             + world.user_category_affinity[user, world.category_of(slot)]
             + POSITION_LOGIT_PER_SLOT * position + cfg.drift_logit_per_day * days)
    if cfg.shock_hour is not None:
        shocked = t_ms >= cfg.start_ms + int(cfg.shock_hour * 3_600_000)
        up = world.category_of(slot) < cfg.shock_categories
        logit = logit + np.where(shocked, np.where(up, cfg.shock_logit, -cfg.shock_logit), 0.0)
    e = cfg.effects
    if e.novelty_logit:
        age_h = np.maximum((t_ms - cfg.start_ms) / 3_600_000 - world.ad_birth_hour[gen, slot], 0.0)
        logit = logit + e.novelty_logit * np.exp2(-age_h / e.novelty_half_life_h)
    if e.hour_logit:
        hour_of_day = (t_ms / 3_600_000) % 24
        logit = logit + e.hour_logit * np.cos(2 * np.pi * (hour_of_day - 20) / 24)
    return logit


def true_cvr_logit(cfg: SimulatorConfig, world: World, user: np.ndarray, slot: np.ndarray, gen: np.ndarray,
                   t_ms: np.ndarray) -> np.ndarray:
    """The conversion logit (given a click) of each impression before the run's offset."""
    days = (t_ms - cfg.start_ms) / 86_400_000.0
    logit = latent_cvr_logit(world, user, slot, gen) + world.ad_cvr_bias[gen, slot] + cfg.drift_logit_per_day * days
    if cfg.effects.advertiser_cvr_sd:
        logit = logit + cfg.effects.advertiser_cvr_sd * world.advertiser_cvr_z[world.advertiser_of(slot)]
    return logit


# Users who would click an ad rarely hide it: the negative-feedback logit falls with the click logit.
NEG_CTR_SLOPE = -0.3


def true_neg_logit(world: World, user: np.ndarray, slot: np.ndarray, gen: np.ndarray,
                   ctr_logit: np.ndarray) -> np.ndarray:
    """The negative-feedback (hide or report) logit of each impression before the run's offset: the ad's own
    annoyance, the user's readiness to hide, and less for an ad the user would click."""
    return world.ad_neg_bias[gen, slot] + world.user_neg_bias[user] + NEG_CTR_SLOPE * ctr_logit


def negative_feedback(cfg: SimulatorConfig, neg_logit: np.ndarray, offset: float, t_ms: np.ndarray,
                      feedback_window_s: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The truth columns of negative feedback: ``true_pneg``, ``negative``, ``feedback_kind`` (hide | report, ""
    without) and ``feedback_time_ms`` (inside the feedback window; -1 without), drawn independently of the click."""
    n = len(t_ms)
    p = expit(neg_logit + offset)
    negative = rng.random(n) < p
    report = rng.random(n) < cfg.report_share
    delay = np.minimum(rng.lognormal(np.log(cfg.feedback_delay_median_s), cfg.feedback_delay_sigma, n),
                       0.95 * feedback_window_s)
    t = np.asarray(t_ms, dtype=np.int64)
    return {"true_pneg": p, "negative": negative,
            "feedback_kind": np.where(negative, np.where(report, "report", "hide"), ""),
            "feedback_time_ms": np.where(negative, t + (delay * 1000).astype(np.int64), -1)}


def sequential_outcomes(cfg: SimulatorConfig, world: World, user: np.ndarray, ad_id: np.ndarray,
                        category: np.ndarray, t_ms: np.ndarray, ctr_logit: np.ndarray, cvr_logit: np.ndarray,
                        u_click: np.ndarray, u_conv: np.ndarray, click_ms: np.ndarray, conversion_ms: np.ndarray,
                        offsets: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The click and conversion logits (before the offsets) and clicks with the sequential effects, drawn an hour
    at a time in time order (``t_ms`` sorted) with the given uniforms, each hour seeing the outcomes before it."""
    behaviour = Behaviour(cfg, len(world.user_p))
    ctr, cvr, clicked = ctr_logit.copy(), cvr_logit.copy(), np.zeros(len(t_ms), dtype=bool)
    hour_starts = cfg.start_ms + 3_600_000 * np.arange(int(np.ceil(cfg.hours)) + 1)
    bounds = np.searchsorted(t_ms, hour_starts, side="left").tolist() + [len(t_ms)]
    for h, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if a == b:
            continue
        behaviour.advance(int(hour_starts[h]))
        rows = slice(a, b)
        ctr[rows] += behaviour.ctr_logit(user[rows], ad_id[rows], category[rows], t_ms[rows])
        cvr[rows] += behaviour.cvr_logit(user[rows])
        clicked[rows] = u_click[rows] < expit(ctr[rows] + offsets[0])
        converts = clicked[rows] & (u_conv[rows] < expit(cvr[rows] + offsets[1]))
        behaviour.observe(user[rows], ad_id[rows], category[rows], t_ms[rows], clicked[rows], click_ms[rows],
                          converts, conversion_ms[rows])
    return ctr, cvr, clicked


def simulate_traffic(cfg: SimulatorConfig, world: World, rng: np.random.Generator, click_window_s: float,
                     conversion_window_s: float, feedback_window_s: float = 30.0) -> pd.DataFrame:
    """One row per impression with its served context, true probabilities and true outcomes. Negative feedback is
    drawn from its own generator after everything else, so the other columns are what they were without it."""
    slot_counts = np.arange(1, MAX_SLOTS + 1)
    slot_p = np.array([0.4, 0.3, 0.2, 0.1])
    req_time = _request_times(cfg, rng, float(slot_counts @ slot_p))
    n_req = len(req_time)
    n_slots = rng.choice(slot_counts, n_req, p=slot_p)
    req_user = rng.choice(len(world.user_p), n_req, p=world.user_p)
    req_place = rng.choice(len(PLACEMENTS), n_req, p=PLACEMENT_P)
    req_device = rng.choice(len(DEVICES), n_req, p=DEVICE_P)

    req_idx = np.repeat(np.arange(n_req), n_slots)
    n = len(req_idx)
    position = np.arange(n) - np.repeat(np.cumsum(n_slots) - n_slots, n_slots)
    t_ms = req_time[req_idx]
    user = req_user[req_idx]
    place, device = req_place[req_idx], req_device[req_idx]
    hour = np.minimum((t_ms - cfg.start_ms) // 3_600_000, world.generation.shape[0] - 1)
    slot = rng.choice(world.n_slots, n, p=world.slot_p)
    gen = world.generation[hour, slot]

    ctr_logit = true_ctr_logit(cfg, world, user, slot, gen, place, device, position, t_ms)
    cvr_logit = true_cvr_logit(cfg, world, user, slot, gen, t_ms)
    # The uniforms and delays are drawn in the same order whether or not the truth is sequential.
    u_click, u_conv = rng.random(n), rng.random(n)
    click_delay = np.minimum(rng.lognormal(np.log(cfg.click_delay_median_s), cfg.click_delay_sigma, n),
                             0.95 * click_window_s)
    conv_delay = conversion_delays(cfg, rng, n)
    click_ms = t_ms + (click_delay * 1000).astype(np.int64)
    conversion_ms = click_ms + (conv_delay * 1000).astype(np.int64)
    if cfg.effects.sequential:
        # Two passes: the offsets of the first are solved without the sequential part; the second's on the first's
        # logits, so the run's rates land near the targets.
        ad_id, category = world.ad_id(gen, slot), world.category_of(slot)
        draw = (cfg, world, user, ad_id, category, t_ms, ctr_logit, cvr_logit, u_click, u_conv, click_ms,
                conversion_ms)
        ctr1, cvr1, clicked1 = sequential_outcomes(*draw, (solve_offset(ctr_logit, cfg.ctr),
                                                           solve_offset(cvr_logit, cfg.cvr)))
        offsets = solve_offset(ctr1, cfg.ctr), solve_offset(cvr1[clicked1], cfg.cvr)
        ctr_logit, cvr_logit, clicked = sequential_outcomes(*draw, offsets)
    else:
        offsets = (solve_offset(ctr_logit, cfg.ctr), 0.0)
        clicked = u_click < expit(ctr_logit + offsets[0])
        offsets = (offsets[0], solve_offset(cvr_logit[clicked], cfg.cvr))
    true_pctr = expit(ctr_logit + offsets[0])
    true_pcvr = expit(cvr_logit + offsets[1])
    converts = clicked & (u_conv < true_pcvr)
    # What serving believed: the truth seen through a noisy model.
    served_pctr = expit(ctr_logit + offsets[0] + rng.normal(0, 0.3, n))
    served_pcvr = expit(cvr_logit + rng.normal(0, 0.3, n) + solve_offset(cvr_logit, cfg.cvr))

    neg_logit = true_neg_logit(world, user, slot, gen, ctr_logit)
    feedback = negative_feedback(cfg, neg_logit, solve_offset(neg_logit, cfg.neg_rate), t_ms, feedback_window_s,
                                 np.random.default_rng([cfg.seed, 4]))

    p = cfg.prefix
    ids = np.arange(n)
    campaign = world.campaign_of(slot)
    return pd.DataFrame({
        "impression_id": [f"{p}-i{i}" for i in ids],
        "request_id": [f"{p}-r{i}" for i in req_idx],
        "user_id": user.astype(np.int64),
        "ad_id": world.ad_id(gen, slot).astype(np.int64),
        "advertiser_id": world.advertiser_of(slot).astype(np.int64),
        "campaign_id": campaign.astype(np.int64),
        "category_id": world.category_of(slot).astype(np.int64),
        "placement": PLACEMENTS[place],
        "position": position.astype(np.int64),
        "device": DEVICES[device],
        "bid": np.round(world.campaign_bid[campaign], 4),
        "event_time_ms": t_ms.astype(np.int64),
        "served_pctr": served_pctr,
        "served_pcvr": served_pcvr,
        "true_pctr": true_pctr,
        "true_pcvr": true_pcvr,
        # The latent parts of the logits above (the oracle without the user x ad interaction needs them).
        "ctr_latent_logit": latent_ctr_logit(world, user, slot, gen),
        "cvr_latent_logit": latent_cvr_logit(world, user, slot, gen),
        "clicked": clicked,
        "click_time_ms": np.where(clicked, click_ms, -1),
        "converts": converts,
        "conversion_delay_s": np.where(converts, conv_delay, np.nan),
        "conversion_time_ms": np.where(converts, conversion_ms, -1),
        "converted_in_window": converts & (conv_delay <= conversion_window_s),
        "conversion_value": np.where(converts, np.round(rng.lognormal(np.log(40), 0.8, n), 2), 0.0),
        **feedback,
    })
