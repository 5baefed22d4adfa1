"""The batch cadences on a real Delta training set (local Spark) and a real registry folder: a full retrain that
is promoted, a warm start that names its parent and refuses a day it has seen, and a training run that is
killed and resumed from its checkpoint into exactly the model an uninterrupted run gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from infra.spark_session import spark_session
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import generate
from trainers import full_retrain, warm_start
from trainers.data import InputSpec, encode
from trainers.evaluate import downsample
from trainers.model import Ranker
from trainers.preranker import preranker_of
from trainers.registry import Registry
from trainers.retrieval import towers_of
from trainers.scoring import load
from trainers.train import fit


def training_rows(settings) -> pd.DataFrame:
    """Two simulated days shaped like the training-set builder's rows (a few feature columns included)."""
    cfg = SimulatorConfig(seed=5, start="2026-10-01T00:00:00Z", hours=48, users=500, ads=100,
                          impressions_per_hour=1500, ctr=0.08, cvr=0.2, speed=0, prediction_log=False)
    truth = generate(cfg, settings).truth.rename(columns={"event_time_ms": "impression_time_ms"})
    truth["converted"] = truth["converted_in_window"]
    rows = downsample(truth, 0.5)
    rows["ds"] = pd.to_datetime(rows["impression_time_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%d")
    rows["user_features__user_ctr_7d"] = np.where(rows.index % 3 == 0, np.nan, 0.05)
    rows["ad_realtime__ad_impressions_1h"] = (rows.index % 17).astype(float)
    cols = ["impression_id", "user_id", "ad_id", "advertiser_id", "campaign_id", "category_id", "placement",
            "position", "device", "bid", "impression_time_ms", "clicked", "converted", "sample_rate",
            "user_features__user_ctr_7d", "ad_realtime__ad_impressions_1h", "ds"]
    return rows[cols]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    from batch_jobs.training_set import training_path
    from infra.settings import get_settings

    var = tmp_path_factory.mktemp("cadences")
    settings = get_settings().model_copy(update={"var_dir": var})
    settings = settings.model_copy(update={"trainer": settings.trainer.model_copy(
        update={"id_buckets": 5003, "small_buckets": 101, "epochs": 1, "batch_size": 256})})
    rows = training_rows(settings)
    spark = spark_session("test_cadences", settings)
    spark.createDataFrame(rows).write.format("delta").partitionBy("ds").save(training_path(settings))
    return settings, sorted(rows["ds"].unique())


def test_full_retrain_then_warm_start(lake):
    settings, days = lake
    first = full_retrain.run(settings, end=days[0], days=1)
    registry = Registry(settings.registry_dir)
    assert registry.promoted() == first
    meta = registry.load(first)[1]
    assert meta["data_range"] == [days[0]] and meta["parent"] is None and meta["negative_rate"] == 0.5
    assert set(meta["metrics"]) == {"ctr", "cvr", "ctcvr"} and set(meta["calibrators"]) == {"ctr", "cvr"}
    assert meta["metrics"]["ctr"]["calibrated"]["auc"] > 0.55, meta["metrics"]
    # Candidate retrieval's towers are trained beside the ranker, on the same rows' clicks, and stored with it.
    towers = towers_of(registry, first)
    assert towers is not None and meta["retrieval"]["clicks"] > 100
    # So is the funnel's pre-ranker, distilled from the ranker: it orders held-out rows as the ranker does.
    assert preranker_of(registry, first) is not None
    assert min(meta["preranker"]["held_out"].values()) > 0.95, meta["preranker"]  # 0.998 when written

    second = warm_start.run(settings, ds=days[1])
    meta2 = registry.load(second)[1]
    assert registry.promoted() == second
    assert meta2["parent"] == first and meta2["data_range"] == days[:2] and meta2["cadence"] == "warm"
    # The warm start continues the parent's towers (trained on: their ad table moved from the parent's).
    towers2 = towers_of(registry, second)
    ad_table = "tables.ad_id.weight"
    assert towers2.config == towers.config
    assert not torch.equal(towers2.state_dict()[ad_table], towers.state_dict()[ad_table])
    # Started from the parent's, not afresh: rows of ads no click touched on day 2 keep the parent's values.
    untouched = (towers2.state_dict()[ad_table] == towers.state_dict()[ad_table]).all(1)
    assert untouched.sum() > 0.5 * len(untouched)
    # The promoted model scores rows with the downsampling undone: its mean pCTR is near the true rate.
    scoring = load(registry)
    assert scoring.version == second and scoring.negative_rate == 0.5
    with pytest.raises(SystemExit, match="already trained"):
        warm_start.run(settings, ds=days[1])
    # A rollback serves the full retrain again.
    assert registry.rollback("test: warm start judged worse") == first
    assert load(registry).version == first
    # The rolled-back warm start leaves the batch spine: the next warm start continues from the full retrain.
    assert registry.batch_head() == first and warm_start.parent_of_warm_start(registry).version == first


class Killed(RuntimeError):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_into_the_same_model(tmp_path):
    spec = InputSpec.from_schemas(id_buckets=1009, small_buckets=101)
    rng = np.random.default_rng(3)
    n = 3000
    frame = pd.DataFrame({"user_id": rng.integers(0, 300, n), "ad_id": rng.integers(0, 50, n),
                          "advertiser_id": rng.integers(0, 5, n), "campaign_id": rng.integers(0, 9, n),
                          "category_id": rng.integers(0, 16, n), "placement": "feed", "device": "ios",
                          "position": rng.integers(0, 4, n), "clicked": rng.random(n) < 0.1, "converted": False})
    data = encode(frame, spec)

    def fresh() -> Ranker:
        torch.manual_seed(0)
        model = Ranker(spec, embedding_dim=4, mlp=(16,), experts=2, expert_dim=8)
        model.fit_normalizer(data.dense)
        return model

    whole = fresh()
    fit(whole, data, epochs=2, batch_size=256, lr=1e-2, device=torch.device("cpu"))

    ckpt = tmp_path / "run.ckpt"
    killed = fresh()
    calls = {"n": 0}
    forward = killed.forward

    def dying_forward(batch, position=True):
        calls["n"] += 1
        if calls["n"] == 17:  # mid second epoch, after the checkpoint of step 15
            raise Killed
        return forward(batch, position)

    killed.forward = dying_forward
    with pytest.raises(Killed):
        fit(killed, data, epochs=2, batch_size=256, lr=1e-2, device=torch.device("cpu"), checkpoint=ckpt,
            checkpoint_every=5)
    assert ckpt.exists()
    resumed = fresh()  # a new process: a fresh model, the checkpoint on disk
    progress = fit(resumed, data, epochs=2, batch_size=256, lr=1e-2, device=torch.device("cpu"), checkpoint=ckpt,
                   checkpoint_every=5)
    assert progress.steps == 24 and not ckpt.exists()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
