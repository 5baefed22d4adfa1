"""Issue 19, item 1: the online trainer learns the features serving logged, joined by impression id from the real
prediction-log topic, never the feature store at learning time; impressions with no log record are not learned
online (the uniform baseline's silently, a served one as a dead letter)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from kafka import KafkaProducer

from infra.settings import TrainerSettings
from label_joiner.schemes import example
from schemas.codec import encode as encode_event
from schemas.events import BASELINE_MODEL_VERSION, DeadLetter, PredictionLog, TrainingExample
from tests.conftest import consume_all
from tests.test_online_trainer import produce
from trainers.data import HISTORY_COLUMN, InputSpec, encode
from trainers.online import ExampleState, run, to_rows
from trainers.served_features import ServedFeatures

T = 1_790_000_000_000
CLICKS = "user_realtime__user_clicks_1h"
CTR = "user_features__user_ctr_7d"
SMALL = TrainerSettings(id_buckets=1009, small_buckets=101, embedding_dim=8, online_batch_size=16)


def logged(imp: str, model: str, clicks: float, at: int) -> PredictionLog:
    return PredictionLog(request_id=f"r-{imp}", impression_id=imp, user_id=3, ad_id=5, model_version=model,
                         event_time_ms=at, features={CLICKS: clicks, CTR: 0.125}, pctr=0.05, pcvr=0.1,
                         advertiser_id=2, campaign_id=4, category_id=7, placement="feed", device="ios", position=1,
                         feature_lists={HISTORY_COLUMN: [11.0, 12.0]})


def impression_example(imp: str, model: str, clicked: bool, at: int) -> TrainingExample:
    b = {"impression_id": imp, "user_id": 3, "ad_id": 5, "advertiser_id": 2, "campaign_id": 4, "placement": "feed",
         "position": 1, "device": "ios", "model_version": model, "impression_time_ms": at,
         "click_time_ms": at + 5000, "conversion_time_ms": None}
    kind = "click/c" if clicked else "noclick"
    return TrainingExample(**example(b, "fnw", kind, clicked=clicked, converted=False, label_ctcvr=0.0,
                                     as_of_ms=at + 5000 if clicked else at + 30_000))


def send_logs(settings, logs: list[PredictionLog]) -> None:
    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for log in logs:
        key, value, headers = encode_event(log)
        producer.send(settings.topics.prediction_log, key=key, value=value, headers=headers)
    producer.flush()
    producer.close()


def test_click_examples_carry_the_features_served_before_the_click(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path, "trainer": SMALL})
    # Serving logged A (2 clicks in the last hour before it), then A again (a retried send: the first wins), B,
    # and the uniform baseline's C; D was served by a model but its record never arrived.
    no_lists = logged("B", "v1", 0.0, T + 2).model_copy(update={"feature_lists": {}})  # a new user: no history
    send_logs(settings, [logged("A", "v1", 2.0, T), logged("A", "v1", 9.0, T + 1), no_lists,
                         logged("C", BASELINE_MODEL_VERSION, 0.0, T + 3)])
    examples = [impression_example("A", "v1", True, T), impression_example("B", "v1", False, T + 2),
                impression_example("C", BASELINE_MODEL_VERSION, False, T + 3),
                impression_example("D", "v1", True, T + 4)]

    served = ServedFeatures(settings)
    try:
        assert served.catch_up() == 2  # A and B: the retry of A and the baseline's record are not kept
        rows = to_rows([((0, i), ex) for i, ex in enumerate(examples[:2])], ExampleState(), "fnw",
                       {imp: served.get(imp) for imp in ("A", "B")}).rows
        assert served.get("C") is None and served.get("D") is None
    finally:
        served.close()
    click = rows[0]
    assert click["impression_id"] == "A" and click["clicked"]
    # Exactly the logged inputs: the first record's values, lists and context, not the retry's.
    assert click[CLICKS] == 2.0 and click[CTR] == 0.125 and click[HISTORY_COLUMN] == [11.0, 12.0]
    assert (click["category_id"], click["position"], click["served_model_version"]) == (7, 1, "v1")
    # Read at serving, before the click being learned: no feature can count it.
    assert click["served_time_ms"] < examples[0].click_time_ms
    spec = InputSpec.from_schemas(SMALL.id_buckets, SMALL.small_buckets)
    dense = encode(pd.DataFrame(rows), spec).dense.numpy()
    j = spec.dense_columns.index(CLICKS)
    assert np.isclose(dense[0, j], np.log1p(2.0) if spec.log_scaled[j] else 2.0)

    # The trainer end to end: A and B learned, C (uniform baseline) and D (no record) not; D is a dead letter.
    produce(settings, examples)
    versions = run(settings, scheme="fnw", publish_every_s=2.0, idle_exit_s=5.0, features=True)
    from trainers.registry import Registry

    counts = Registry(settings.registry_dir).meta(versions[-1])["counts"]
    assert counts["learned"] == 2 and counts["unlogged"] == 2, counts
    dead = [DeadLetter.model_validate_json(r.value) for r in consume_all(settings, settings.topics.dead_letters, 1)]
    assert len(dead) == 1 and dead[0].reason.startswith("no prediction log record: impression D"), dead


def test_retention_follows_the_slowest_partition_not_one_skewed_record():
    """Served features are kept ``online_log_retention_days`` before the clock, the minimum over the log's
    partitions of their newest day: a record 100 days ahead on one partition deletes nothing the others need."""
    from types import SimpleNamespace

    from infra.settings import get_settings

    settings = get_settings()
    store = ServedFeatures(settings)  # dict-backed: the retention logic alone
    day = 86_400_000
    retention = settings.trainer.online_log_retention_days

    def keep(imp: str, at: int, partition: int) -> None:
        key, value, headers = encode_event(logged(imp, "v1", 1.0, at))
        assert store._keep(SimpleNamespace(value=value, headers=headers, partition=partition)) == 1

    for d in range(20):  # both partitions log every day
        keep(f"a{d}", T + d * day, 0)
        keep(f"b{d}", T + d * day, 1)
    kept = [d for d in range(20) if store.get(f"a{d}") is not None]
    assert kept == list(range(19 - retention, 20))  # whole days before the clock's retention are gone
    keep("skewed", T + 120 * day, 0)  # a producer clock 100 days ahead
    assert store.get("b19") is not None and store.get(f"a{19 - retention}") is not None  # nothing more deleted
    keep("b-next", T + 20 * day, 1)  # partition 1 moves on: the clock is day 20, one more day goes
    assert store.get(f"a{19 - retention}") is None and store.get(f"a{20 - retention}") is not None
