"""``trainers.epoch_curves`` on rows whose clicks depend on one feature-service column only: one row per ranker,
training seed and epoch; the ranker that sees the column ranks the held-out rows better than the one on ids alone
and than the one without that column's feature view."""

from __future__ import annotations

import numpy as np
import pandas as pd

from infra.settings import get_settings
from trainers.epoch_curves import curves, summary, without_view

FEATURE = "user_features__user_ctr_7d"


def rows(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    signal = rng.random(n)
    clicked = rng.random(n) < 0.02 + 0.3 * signal
    return pd.DataFrame({
        "impression_id": [f"s{seed}-{i}" for i in range(n)], "user_id": rng.integers(0, 5000, n),
        "ad_id": rng.integers(0, 50, n), "advertiser_id": 1, "campaign_id": 1, "category_id": 1,
        "placement": "feed", "device": "ios", "position": 0, FEATURE: signal, "clicked": clicked,
        "converted": clicked & (rng.random(n) < 0.2)})


def test_one_row_per_ranker_seed_and_epoch_and_the_feature_helps():
    settings = get_settings()
    settings = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={
        "id_buckets": 10_007, "small_buckets": 101, "calibration_share": 0.2})})
    table = curves(rows(1, 12_000), rows(2, 4_000), settings, epochs=2, rate=1.0, seed=3, training_seeds=(3, 4),
                   without=("user_features", "ad_features,ad_realtime"))
    assert len(table) == 4 * 2 * 2 and set(table["epoch"]) == {1, 2} and set(table["training_seed"]) == {3, 4}
    assert set(table["ranker"]) == {"with features", "ids and context only", "without user_features",
                                    "without ad_features,ad_realtime"}
    assert table[["validation", "held_out"]].apply(lambda c: c.between(0, 1)).all().all()
    best = summary(table)["best epoch"]
    assert best["with features"] > best["ids and context only"] + 0.05, table
    assert best["with features"] > best["without user_features"] + 0.05, table  # the view that holds the signal
    assert best["without ad_features,ad_realtime"] > best["without user_features"] + 0.05, table  # views without it


def test_without_a_group_drops_every_view_of_it_and_nothing_else():
    frame = pd.DataFrame(columns=["user_id", "user_features__user_ctr_7d", "ad_features__ad_ctr_7d",
                                  "user_realtime__user_clicks_1h", "ad_realtime__ad_clicks_1h"])
    assert list(without_view("gold")(frame).columns) == ["user_id", "user_realtime__user_clicks_1h",
                                                         "ad_realtime__ad_clicks_1h"]
    assert list(without_view("realtime,ad_features")(frame).columns) == ["user_id", "user_features__user_ctr_7d"]
