"""The A/B report's statistics on seeded synthetic experiments (pure logic): an A/A split shows no lift and its
false-positive rate is near the nominal 5 %; a true +20 % CTR lift is detected and its interval covers the truth."""

from __future__ import annotations

import numpy as np
import pandas as pd

from batch_jobs.ab_report import analyze, lifts, ratio_with_variance, user_totals


def experiment(seed: int, users: int = 2000, ctr_lift: float = 0.0) -> pd.DataFrame:
    """Users (the randomization unit) split half and half; each with their own CTR (clustered clicks) and a
    Poisson number of impressions; the treatment multiplies every true pCTR by ``1 + ctr_lift``."""
    rng = np.random.default_rng(seed)
    arm = np.where(rng.random(users) < 0.5, "control", "treatment")
    base = rng.beta(2, 38, users)  # mean CTR 5 %, varying a lot between users
    n = 1 + rng.poisson(9, users)
    user = np.repeat(np.arange(users), n)
    arms = np.repeat(arm, n)
    p = np.repeat(base, n) * np.where(arms == "treatment", 1 + ctr_lift, 1.0)
    pcvr = rng.uniform(0.05, 0.15, len(user))
    clicked = rng.random(len(user)) < p
    return pd.DataFrame({"arm": arms, "user_id": user, "clicked": clicked,
                         "converted": clicked & (rng.random(len(user)) < pcvr),
                         "price": rng.uniform(1, 5, len(user)), "true_pctr": p, "true_pcvr": pcvr})


def ctr_row(result: dict) -> dict:
    return next(r for r in result["lifts"] if r["metric"] == "ctr" and r["arm"] == "treatment")


def test_ratio_variance_matches_the_spread_of_the_estimate():
    rng = np.random.default_rng(0)
    estimates, variances = [], []
    for _ in range(1200):  # the ratio of variances is itself a sample: 1,200 repetitions put each bound ~5 sd away
        den = 1 + rng.poisson(9, 500).astype(float)
        num = rng.binomial(den.astype(int), rng.beta(2, 38, 500)).astype(float)
        r, v = ratio_with_variance(num, den)
        estimates.append(r)
        variances.append(v)
    assert 0.8 < np.var(estimates) / np.mean(variances) < 1.25


def test_aa_split_shows_no_lift():
    result = analyze(experiment(seed=1), control="control")
    row = ctr_row(result)
    assert row["ci_low"] < 0 < row["ci_high"] and not row["significant"], row
    assert {a["arm"] for a in result["arms"]} == {"control", "treatment"}
    arm = next(a for a in result["arms"] if a["arm"] == "control")
    assert arm["users"] > 900 and 0.04 < arm["ctr"] < 0.06 and arm["rpm"] > 0
    assert abs(row["true_lift"]) < 1e-9 or row["covered"]  # the truth: no lift


def test_aa_false_positive_rate_is_near_five_percent():
    significant = []
    for seed in range(200):
        users = user_totals(experiment(seed, users=1000))
        row = lifts(users, "control").query("metric == 'ctr'").iloc[0]
        significant.append(bool(row["significant"]))
    rate = np.mean(significant)
    assert 0.01 <= rate <= 0.12, rate


def test_a_true_ctr_lift_is_detected_and_covered():
    result = analyze(experiment(seed=2, users=10_000, ctr_lift=0.2), control="control")
    row = ctr_row(result)
    assert row["significant"] and row["ci_low"] > 0, row
    assert abs(row["true_lift"] - 0.2) < 0.05  # the expected CTRs of the impressions shown
    assert row["covered"], row
    # Coverage over repeated experiments is near the nominal 95 %.
    covered = [ctr_row(analyze(experiment(seed, users=3000, ctr_lift=0.2)))["covered"] for seed in range(40)]
    assert np.mean(covered) >= 0.85, np.mean(covered)


def test_without_control_there_is_no_lift():
    frame = experiment(seed=3, users=200).replace({"arm": {"control": "a"}})
    result = analyze(frame, control="control")
    assert result["lifts"] == [] and len(result["arms"]) == 2
