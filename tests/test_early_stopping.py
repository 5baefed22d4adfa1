"""Early stopping in the batch training loop (``trainers.train.fit`` with validation rows): it stops once the
validation ranking stops improving, keeps the best epoch's weights, and a killed run resumes into the same model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from trainers.data import Batch, InputSpec, encode
from trainers.model import Ranker
from trainers.train import fit, validation_score

SPEC = InputSpec.from_schemas(id_buckets=1009, small_buckets=101)
CPU = torch.device("cpu")


class Killed(Exception):
    pass


def rows(seed: int, n: int) -> Batch:
    """Clicks and conversions that depend on the ad (learnable) and on nothing else, over many users (easy to
    memorize)."""
    rng = np.random.default_rng(seed)
    ad = rng.integers(0, 20, n)
    clicked = rng.random(n) < 0.05 + 0.02 * (ad % 10)
    frame = pd.DataFrame({"user_id": rng.integers(0, 2000, n), "ad_id": ad, "advertiser_id": ad % 5,
                          "campaign_id": ad % 9, "category_id": ad % 16, "placement": "feed", "device": "ios",
                          "position": rng.integers(0, 4, n), "clicked": clicked,
                          "converted": clicked & (rng.random(n) < 0.1 + 0.04 * (ad % 5))})
    return encode(frame, SPEC)


def fresh(data: Batch) -> Ranker:
    torch.manual_seed(0)
    model = Ranker(SPEC, embedding_dim=8, mlp=(32,), experts=2, expert_dim=8)
    model.fit_normalizer(data.dense)
    return model


@pytest.fixture(scope="module")
def data() -> tuple[Batch, Batch]:
    return rows(1, 3000), rows(2, 1500)


def test_stops_when_the_validation_ranking_stops_improving_and_keeps_the_best_epoch(data):
    train, valid = data
    model = fresh(train)
    progress = fit(model, train, epochs=12, batch_size=128, lr=1e-2, device=CPU, validation=valid, patience=2)
    # It memorizes the users within a few epochs: the validation AUC stopped improving and training stopped there.
    assert 3 <= len(progress.validation) < 12
    assert progress.validation[-1] < max(progress.validation) and progress.validation[-2] < max(progress.validation)
    assert progress.best_epoch == int(np.argmax(progress.validation)) + 1
    # The model kept the best epoch's weights, the same as a run of exactly that many epochs without validation.
    assert validation_score(model, valid, CPU) == pytest.approx(max(progress.validation), rel=1e-9)
    plain = fresh(train)
    fit(plain, train, epochs=progress.best_epoch, batch_size=128, lr=1e-2, device=CPU)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_without_validation_patience_or_clicks_to_rank_every_epoch_runs(data):
    train, valid = data
    no_clicks = valid.slice(torch.nonzero(valid.label_ctr < 0.5).squeeze(1))  # nothing to rank: no early stopping
    for kwargs in ({}, {"validation": valid, "patience": 0}, {"validation": no_clicks, "patience": 1}):
        progress = fit(fresh(train), train, epochs=3, batch_size=128, lr=1e-2, device=CPU, **kwargs)
        assert progress.steps == 3 * 24 and progress.best_epoch is None and progress.validation == []


def test_a_killed_run_resumes_with_its_validation_history(data, tmp_path):
    train, valid = data
    whole = fresh(train)
    expected = fit(whole, train, epochs=12, batch_size=128, lr=1e-2, device=CPU, validation=valid)
    assert len(expected.validation) >= 3

    ckpt = tmp_path / "run.ckpt"
    killed = fresh(train)
    forward, calls = killed.forward, {"n": 0}

    def dying_forward(batch, position=True):
        calls["n"] += 1
        if calls["n"] == 24 * 2 + 10:  # into the third epoch (a validation pass is one call)
            raise Killed
        return forward(batch, position)

    killed.forward = dying_forward
    with pytest.raises(Killed):
        fit(killed, train, epochs=12, batch_size=128, lr=1e-2, device=CPU, checkpoint=ckpt, checkpoint_every=5,
            validation=valid)
    resumed = fresh(train)
    progress = fit(resumed, train, epochs=12, batch_size=128, lr=1e-2, device=CPU, checkpoint=ckpt,
                   checkpoint_every=5, validation=valid)
    assert progress.validation == pytest.approx(expected.validation, rel=1e-6)
    assert progress.best_epoch == expected.best_epoch
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
