"""Calibration and offline metrics: downsampling correction, isotonic/Platt calibrators, reliability plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainers.calibration import Calibrator, fit_task_calibrators, reliability_plot, undo_downsampling
from trainers.metrics import auc, ece, log_loss, normalized_entropy, reliability, summary

N = 200_000


def _population(seed: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """True click probabilities (CTR-like, mean ~0.05) and the clicks drawn from them."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1.0, 19.0, n)
    return p, (rng.random(n) < p).astype(np.float64)


def test_undo_downsampling_known_case():
    assert undo_downsampling(0.5, 0.1) == pytest.approx(0.5 / 5.5, abs=1e-12)  # 0.0909...
    assert undo_downsampling(0.3, 1.0) == pytest.approx(0.3)
    out = undo_downsampling(np.array([0.0, 0.5, 1.0]), 0.25)
    np.testing.assert_allclose(out, [0.0, 0.2, 1.0])
    with pytest.raises(ValueError):
        undo_downsampling(0.5, 0.0)


def test_undo_downsampling_restores_the_true_rate():
    p, y = _population(seed=1)
    rate = 0.2
    keep = (y == 1) | (np.random.default_rng(2).random(len(y)) < rate)
    p_kept, y_kept = p[keep], y[keep]
    # On the downsampled set the positive rate given p is p / (p + (1 - p) * w): the odds grow by 1 / w.
    q = p_kept / (p_kept + (1 - p_kept) * rate)
    assert y_kept.mean() > 2 * y.mean()
    assert abs(y_kept.mean() - q.mean()) < 0.005
    assert ece(y_kept, q) < 0.01
    # A model calibrated on the downsampled set predicts q; undoing the downsampling gives back p.
    np.testing.assert_allclose(undo_downsampling(q, rate), p_kept, rtol=1e-9)
    restored = undo_downsampling(p / (p + (1 - p) * rate), rate)
    assert abs(restored.mean() - y.mean()) < 0.002
    assert abs(restored.mean() - p.mean()) < 1e-9


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrator_fixes_a_miscalibrated_model(method):
    p_fit, y_fit = _population(seed=3)
    p_test, y_test = _population(seed=4)
    raw_fit, raw_test = np.sqrt(p_fit), np.sqrt(p_test)  # over-predicts everywhere
    assert ece(y_test, raw_test) > 0.1
    cal = Calibrator(method).fit(raw_fit, y_fit)
    calibrated = cal.transform(raw_test)
    assert ece(y_test, calibrated) < 0.01
    assert log_loss(y_test, calibrated) < log_loss(y_test, raw_test)
    assert auc(y_test, calibrated) == pytest.approx(auc(y_test, raw_test), abs=0.01)  # ranking kept
    assert calibrated.min() >= 1e-6 and calibrated.max() <= 1 - 1e-6


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrator_json_round_trip(method):
    p, y = _population(seed=5, n=20_000)
    cal = Calibrator(method).fit(np.sqrt(p), y)
    stored = json.loads(json.dumps(cal.to_json()))
    again = Calibrator.from_json(stored)
    assert again.method == method
    grid = np.concatenate([np.linspace(0, 1, 1001), np.sqrt(p[:1000])])
    np.testing.assert_array_equal(again.transform(grid), cal.transform(grid))


def test_isotonic_stays_inside_open_interval_and_accepts_soft_labels():
    cal = Calibrator("isotonic").fit([0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0])
    out = cal.transform([0.0, 0.15, 0.95, 1.0])
    assert out[0] == 1e-6 and out[-1] == 1 - 1e-6
    soft = Calibrator("isotonic").fit([0.5] * 4, [0.25, 0.25, 0.25, 0.25])
    assert soft.transform([0.5])[0] == pytest.approx(0.25)
    with pytest.raises(RuntimeError):
        Calibrator("platt").transform([0.5])
    with pytest.raises(ValueError):
        Calibrator("beta")


def test_fit_task_calibrators():
    p, y = _population(seed=6, n=20_000)
    preds = {"ctr": np.sqrt(p), "ctcvr": np.sqrt(p) / 3}
    labels = {"ctr": y, "ctcvr": y * (p > 0.05)}
    cals = fit_task_calibrators(preds, labels, method="platt")
    assert set(cals) == {"ctr", "ctcvr"}
    assert all(c.method == "platt" for c in cals.values())
    assert ece(labels["ctcvr"], cals["ctcvr"].transform(preds["ctcvr"])) < ece(labels["ctcvr"], preds["ctcvr"])


def test_metric_sanity():
    rng = np.random.default_rng(7)
    y = (rng.random(10_000) < 0.1).astype(float)
    assert auc(y, y + rng.random(len(y)) * 0.5) == 1.0  # every positive ranked above every negative
    assert np.isnan(auc(np.ones(5), np.linspace(0, 1, 5)))
    rate = y.mean()
    assert normalized_entropy(y, np.full(len(y), rate)) == pytest.approx(1.0)
    p, clicks = _population(seed=8)
    assert ece(clicks, p) < 0.005  # the true probabilities are calibrated
    assert ece(clicks, p, strategy="uniform") < 0.005
    assert normalized_entropy(clicks, p) < 1.0
    w = rng.random(len(p)) + 0.5
    per_row = -(clicks * np.log(p) + (1 - clicks) * np.log1p(-p))
    assert log_loss(clicks, p, w) == pytest.approx(np.average(per_row, weights=w))
    assert log_loss([0.3], [0.3]) == pytest.approx(-(0.3 * np.log(0.3) + 0.7 * np.log(0.7)))  # soft labels


def test_reliability_and_summary():
    p, y = _population(seed=9, n=50_000)
    table = reliability(y, p, bins=10)
    assert list(table.columns[:3]) == ["p_mean", "rate", "count"]
    assert len(table) == 10 and table["count"].sum() == 50_000
    assert table["p_mean"].is_monotonic_increasing
    s = summary(y, p)
    assert set(s) == {"auc", "nll", "ne", "ece", "mean_p", "rate", "n"}
    assert s["n"] == 50_000 and 0.5 < s["auc"] < 1 and s["ne"] < 1
    assert s["mean_p"] == pytest.approx(s["rate"], abs=0.005)


def test_reliability_plot_writes_png(tmp_path):
    p, y = _population(seed=10, n=20_000)
    raw = np.sqrt(p)
    cal = Calibrator("isotonic").fit(raw, y)
    results = {"raw": (y, raw), "calibrated": (y, cal.transform(raw)), "oracle": (y, p)}
    path = reliability_plot(results, tmp_path / "plots" / "ctr.png", title="CTR calibration")
    assert path.exists() and path.stat().st_size > 1024
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_platt_never_reverses_the_ranking_on_a_small_noisy_fit():
    """The demo's full retrain fitted Platt on 92 held-out rows with 17 clicks whose raw AUC happened to be 0.45:
    the slope came out negative and the served pCTR ranked ads backwards (held-out AUC 0.705 became 0.295).
    With few positives, or a fitted slope that is not positive, only the offset is fitted: the order is kept and
    the mean prediction matches the observed rate."""
    from trainers.calibration import PLATT_MIN_POSITIVES

    rng = np.random.default_rng(11)
    raw = rng.uniform(0.01, 0.06, 92)
    clicked = np.zeros(92)
    clicked[np.argsort(raw)[:17]] = 1  # the lowest scores clicked: a sample that anti-correlates by chance
    cal = Calibrator("platt").fit(raw, clicked)
    assert cal.a == 1.0
    calibrated = cal.transform(raw)
    assert np.all(np.diff(calibrated[np.argsort(raw)]) > 0)  # strictly increasing: the ranking kept
    assert calibrated.mean() == pytest.approx(clicked.mean(), rel=1e-6)
    # Enough positives yet anti-correlated: the slope is still not allowed to go negative.
    raw = rng.uniform(0.01, 0.5, 20_000)
    y = rng.random(20_000) < (0.51 - raw)
    assert y.sum() >= PLATT_MIN_POSITIVES
    cal = Calibrator("platt").fit(raw, y)
    assert cal.a == 1.0 and cal.transform(raw).mean() == pytest.approx(y.mean(), rel=1e-6)
    # Enough positives and a real signal: the full two-parameter fit, slope positive.
    y = rng.random(20_000) < raw / 2
    assert Calibrator("platt").fit(raw, y).a > 0 and Calibrator("platt").fit(raw, y).a != 1.0


def test_apply_calibrators_serves_pctcvr_as_pctr_times_calibrated_pcvr():
    from trainers.scoring import apply_calibrators

    rng = np.random.default_rng(8)
    raw = {"ctr": rng.uniform(0.01, 0.3, 500), "cvr": rng.uniform(0.01, 0.5, 500)}
    raw["ctcvr"] = raw["ctr"] * raw["cvr"]
    fitted = {task: Calibrator("platt").fit(raw[task], rng.random(500) < raw[task] / 2) for task in ("ctr", "cvr")}
    out = apply_calibrators(fitted, raw)
    assert np.allclose(out["cvr"], fitted["cvr"].transform(raw["cvr"]))
    assert np.allclose(out["ctcvr"], out["ctr"] * out["cvr"]) and not np.allclose(out["ctcvr"], raw["ctcvr"])
    # A version registered before pCVR had its own calibrator carries a CTCVR one: its pCVR stays the ratio.
    older = {task: Calibrator("platt").fit(raw[task], rng.random(500) < raw[task] / 2) for task in ("ctr", "ctcvr")}
    out = apply_calibrators(older, raw)
    assert np.allclose(out["ctcvr"], np.minimum(older["ctcvr"].transform(raw["ctcvr"]), out["ctr"]))
    assert np.allclose(out["cvr"], out["ctcvr"] / out["ctr"])


def test_the_cadences_calibrate_pcvr_on_the_held_out_clicks():
    """``cadence.calibrate`` fits pCVR's calibrator on the clicked rows of its fitting half (label: converted): there
    the served pCVR's mean is the clicks' conversion rate (Platt keeps the mean on what it was fitted on), which the
    older ratio of two separately calibrated maps, pCTCVR / pCTR, did not give. Metrics cover pCVR on the other half's
    clicks and the product pCTCVR."""
    import torch

    from infra.settings import get_settings
    from tests.test_cadences import training_rows
    from trainers.cadence import calibrate, calibration_half
    from trainers.data import InputSpec, encode
    from trainers.model import Ranker
    from trainers.scoring import ScoringModel
    from trainers.train import fit

    settings = get_settings()
    cfg = settings.trainer.model_copy(update={"id_buckets": 5003, "small_buckets": 101})
    rows = training_rows(settings)
    first = rows["ds"] == rows["ds"].min()
    spec = InputSpec.from_schemas(cfg.id_buckets, cfg.small_buckets)
    torch.manual_seed(0)
    model = Ranker.from_settings(spec, cfg)
    fit(model, encode(rows[first], spec), epochs=1, batch_size=256, lr=cfg.learning_rate, device=torch.device("cpu"))
    scoring = ScoringModel(model, negative_rate=0.5)
    held = rows[~first].reset_index(drop=True)
    metrics = calibrate(scoring, held, spec, torch.device("cpu"))

    assert set(scoring.calibrators) == {"ctr", "cvr"} and set(metrics) == {"ctr", "cvr", "ctcvr"}
    fitting = held[calibration_half(held)].reset_index(drop=True)
    served = scoring.score(encode(fitting, spec))
    assert np.allclose(served["ctcvr"], served["ctr"] * served["cvr"])
    clicked = fitting["clicked"].to_numpy(bool)
    rate = fitting["converted"].to_numpy(float)[clicked].mean()
    assert served["cvr"][clicked].mean() == pytest.approx(rate, rel=1e-3), (served["cvr"][clicked].mean(), rate)
    # pCVR's metrics are measured on the other half's clicks only.
    evaluated = held[~calibration_half(held)]
    clicks = evaluated[evaluated["clicked"].astype(bool)]
    assert metrics["cvr"]["calibrated"]["rate"] == pytest.approx(clicks["converted"].mean())
