"""The Spark batch twin and the streaming worker agree, impression by impression, on the same events."""

from __future__ import annotations

import time
import uuid
from datetime import date

import pandas as pd

from batch_jobs.matured_labels import run
from label_joiner.delay_curve import read_matured
from label_joiner.evaluate import join_accuracy
from label_joiner.worker import start_worker, stop_worker
from streams.simulator.config import SimulatorConfig
from tests.conftest import simulated_run

# Every defect but late arrival (the batch job sees all events at once, so lateness cannot differ).
CFG = SimulatorConfig(hours=2, users=10_000, ads=2_000, impressions_per_hour=6_000, cvr=0.08, speed=0,
                      prediction_log=False, seed=23, late_share=0.0)
COLUMNS = ["clicked", "converted", "click_time_ms", "conversion_time_ms", "conversion_value"]


def test_batch_equals_stream(fresh_topics, tmp_path):
    settings, gen = simulated_run(fresh_topics, tmp_path, CFG)
    expected = int((~gen.truth["impression_malformed"]).sum())

    worker = start_worker(settings, f"lj-{uuid.uuid4().hex[:6]}", tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 180
        while len(stream := read_matured(settings)) < expected and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        stop_worker(worker)
    assert len(stream) == expected

    path = run(date(2026, 11, 2), settings)
    from infra.spark_session import spark_session

    batch = spark_session("test", settings).read.format("delta").load(path).toPandas()
    assert len(batch) == expected
    # Re-running the day replaces it rather than appending.
    run(date(2026, 11, 2), settings)
    assert spark_session("test", settings).read.format("delta").load(path).count() == expected

    s = stream.set_index("impression_id").sort_index()[COLUMNS]
    b = batch.set_index("impression_id").sort_index()[COLUMNS]
    pd.testing.assert_frame_equal(s, b, check_dtype=False)
    assert join_accuracy(batch, gen.truth, settings.windows).exact
