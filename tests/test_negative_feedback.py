"""Negative feedback (issue 20, item 8): the simulator's hides and reports follow their own truth, reach the joiner's
topic as ``NegativeFeedback`` records, and label the ranker's negative-feedback tower (the joiner, the batch twin
and the worker are checked against the same truth in test_join_logic, test_batch_twin and test_label_joiner_worker).
Pure generation here: no broker."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import torch

from infra.settings import get_settings
from schemas.codec import decode
from schemas.events import NegativeFeedback
from streams.simulator.closed_loop import ClosedLoop, random_policy
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import iter_messages
from streams.simulator.run import generate
from trainers.data import encode
from trainers.metrics import auc

START = datetime.fromisoformat("2026-10-01T00:00:00+00:00")
CFG = SimulatorConfig(seed=9, start=START, hours=8, users=3_000, ads=400, impressions_per_hour=15_000, speed=0,
                      prediction_log=False, neg_rate=0.01, report_share=0.2)


def test_simulated_feedback_follows_its_truth_and_window():
    settings = get_settings()
    gen = generate(CFG, settings, drain=True)
    t = gen.truth
    n, neg = len(t), t["negative"].to_numpy()
    # ~1,200 hides and reports: the rate within 5 binomial sds of the target, the report share too.
    assert abs(neg.mean() - CFG.neg_rate) < 5 * np.sqrt(CFG.neg_rate * (1 - CFG.neg_rate) / n)
    assert abs(t["true_pneg"].mean() - CFG.neg_rate) < 1e-6  # the offset is solved on the run
    reports = (t["feedback_kind"] == "report").to_numpy()
    assert abs(reports[neg].mean() - CFG.report_share) < 5 * np.sqrt(0.2 * 0.8 / neg.sum())
    assert set(t.loc[~neg, "feedback_kind"]) == {""} and (t.loc[~neg, "feedback_time_ms"] == -1).all()
    delay_s = (t.loc[neg, "feedback_time_ms"] - t.loc[neg, "event_time_ms"]) / 1000
    assert delay_s.min() >= 0 and delay_s.max() <= settings.windows.feedback_window_s
    # The truth has something to learn: the oracle's pNeg ranks the hides well above chance.
    assert auc(neg.astype(float), t["true_pneg"].to_numpy()) > 0.7

    # Every hide and report is delivered on its topic as a valid record (bar the malformed share), keyed by impression.
    topic = settings.topics.negative_feedback
    records = [(key, value, headers) for tp, key, value, headers, _ in iter_messages(gen.schedule) if tp == topic]
    decoded = []
    for key, value, headers in records:
        try:
            decoded.append((key, decode(NegativeFeedback, value, headers)))
        except Exception:  # noqa: BLE001 - the malformed share, counted below
            continue
    malformed = int(t["negative_feedback_malformed"].sum())
    duplicated = int(t["negative_feedback_duplicated"].sum())
    assert len(records) == neg.sum() + duplicated and len(decoded) >= neg.sum() - 2 * malformed
    assert all(k.decode() == f.impression_id for k, f in decoded)
    by_id = t.set_index("impression_id")
    assert all(by_id.at[f.impression_id, "negative"] and by_id.at[f.impression_id, "feedback_kind"] == f.kind
               for _, f in decoded)

    # The same seed gives the same feedback; the labels reach the model's batch (NaN only where unknown).
    again = generate(CFG, settings, drain=True).truth
    cols = ["negative", "feedback_kind", "feedback_time_ms", "true_pneg"]
    pd.testing.assert_frame_equal(t[cols], again[cols])
    rows = t.head(2_000).rename(columns={"event_time_ms": "impression_time_ms"})
    labels = encode(rows.assign(negative_feedback=rows["negative"]), _spec()).label_neg
    assert torch.equal(labels, torch.tensor(rows["negative"].to_numpy(), dtype=torch.float32))
    unknown = encode(rows.assign(negative_feedback=pd.Series([None] * len(rows), dtype=object)), _spec()).label_neg
    assert torch.isnan(unknown).all()


def test_the_closed_loop_emits_feedback_from_the_same_truth():
    cfg = CFG.model_copy(update={"hours": 3.0, "impressions_per_hour": 6_000})
    loop = ClosedLoop(cfg, get_settings(), candidates=20, budget_scale=1e6)
    shown = pd.concat([loop.serve_hour(h, random_policy) for h in range(3)], ignore_index=True)
    neg = shown["negative"].to_numpy()
    assert len(shown) > 10_000 and neg.sum() > 50
    assert abs(neg.mean() - cfg.neg_rate) < 0.5 * cfg.neg_rate  # the offset was solved under random serving
    assert auc(neg.astype(float), shown["true_pneg"].to_numpy()) > 0.7
    loop.deliveries(0, shown[shown["impression_id"].str.startswith(f"{cfg.prefix}-h0")].copy())
    topics = {topic for _, topic, *_ in loop.pending}
    assert get_settings().topics.negative_feedback in topics


def _spec():
    from trainers.data import InputSpec

    return InputSpec.from_schemas(1009, 101)
