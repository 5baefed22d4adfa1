"""``trainers.learning_curve``: one row per history length and model on the held-out day, the oracle ahead of
both learners, a longer history no worse for LightGBM; ``gaps`` signs a better ranker positive on AUC and log
loss alike."""

from __future__ import annotations

import pandas as pd
import pytest

from infra.settings import get_settings
from trainers.learning_curve import curve, gaps, world


def test_one_row_per_history_length_and_model_and_the_oracle_ahead():
    settings = get_settings()
    settings = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"epochs": 2})})
    frame = world(settings, seed=5, days=3, users=300, ads=60, impressions_per_hour=600)
    assert sorted(frame["day"].unique()) == [0, 1, 2, 3]
    table = curve(frame, settings, history_days=[1, 3], training_seeds=[1, 2], seed=5)
    assert list(zip(table["days"], table["model"], strict=True)) == [
        (0, "oracle"), (1, "lightgbm"), (1, "ranker"), (3, "lightgbm"), (3, "ranker")]
    rows = table.set_index(["days", "model"])["rows"]
    assert rows[(3, "ranker")] == rows[(3, "lightgbm")] > 2.5 * rows[(1, "ranker")]  # same rows, three days
    learners = table[table["model"] != "oracle"]
    assert (learners["ctr_auc"] < table.loc[0, "ctr_auc"] - 0.03).all(), table
    assert (learners["ctr_auc"] > 0.55).all(), table  # both learn something from ids alone
    assert table.loc[3, "ctr_auc"] > table.loc[1, "ctr_auc"], table  # LightGBM: three days rank better than one


def test_gaps_are_positive_where_the_ranker_is_ahead():
    table = pd.DataFrame([
        {"days": 0, "model": "oracle", "ctr_auc": 0.9, "ctr_nll": 0.10},
        {"days": 2, "model": "lightgbm", "ctr_auc": 0.75, "ctr_nll": 0.18},
        {"days": 2, "model": "ranker", "ctr_auc": 0.73, "ctr_nll": 0.19},
        {"days": 8, "model": "lightgbm", "ctr_auc": 0.79, "ctr_nll": 0.17},
        {"days": 8, "model": "ranker", "ctr_auc": 0.80, "ctr_nll": 0.16}])
    diff = gaps(table)
    assert list(diff.index) == [2, 8]
    assert diff.loc[2, "ctr_auc"] == pytest.approx(-0.02) and diff.loc[2, "ctr_nll"] == pytest.approx(-0.01)
    assert diff.loc[8, "ctr_auc"] == pytest.approx(0.01) and diff.loc[8, "ctr_nll"] == pytest.approx(0.01)

