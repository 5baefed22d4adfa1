"""The loop closed on the real broker, Redis and a registry: the simulator's ad server asks the scorer, the
impressions it emits carry the scorer's choices, every shown ad is in the prediction log as scored, frequency
caps hold, and an A/A experiment shows no significant lift."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from batch_jobs.ab_report import analyze
from schemas.codec import InvalidEvent, decode
from schemas.events import Impression, PredictionLog
from streams.serving.prediction_log import PredictionLogger
from streams.serving.scorer import Scorer
from streams.simulator.closed_loop import ClosedLoop, run_hours, scorer_policy
from streams.simulator.config import SimulatorConfig
from streams.simulator.run import make_producer
from tests.conftest import consume_all
from tests.test_scorer import register, serving_settings
from trainers.registry import Registry


def test_closed_loop_through_the_scorer(fresh_topics, tmp_path):
    arms = {"A": (0, 500, "promoted"), "B": (500, 1000, "promoted")}  # an A/A test: the same model twice
    settings = serving_settings(fresh_topics, tmp_path, experiment=arms, frequency_cap=2, explore_share=0.2)
    registry = Registry(settings.registry_dir)
    version = register(registry, settings, seed=5)
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)
    cfg = SimulatorConfig(seed=5, start=day, hours=2, users=1_500, ads=600, impressions_per_hour=1_500,
                          prediction_log=False)
    logger = PredictionLogger(settings).start()
    scorer = Scorer(settings, registry, logger=logger, threads=1).start()
    producer = make_producer(settings)
    try:
        truth = run_hours(ClosedLoop(cfg, settings, candidates=40), range(0, 2), scorer_policy(scorer), producer,
                          speed=0)
        assert logger.flush(60)
    finally:
        producer.close()
        scorer.close()
        logger.close()
    assert len(truth) > 1_000 and set(truth["model_version"]) == {version}

    # Every shown ad was logged once, as the scorer scored it, in the user's arm.
    logged = {}
    for rec in consume_all(settings, settings.topics.prediction_log, len(truth)):
        log = decode(PredictionLog, rec.value, rec.headers)
        logged.setdefault(log.impression_id, log)
    assert set(logged) == set(truth["impression_id"])
    for row in truth.itertuples():
        log = logged[row.impression_id]
        assert (log.ad_id, log.position, log.arm, log.model_version) == (row.ad_id, row.position, row.arm, version)
        assert log.pctr == row.served_pctr and log.price == row.price and log.explored == row.explored
    assert truth["explored"].any()  # new ads get their share

    # The impressions the simulator delivered name the model and the prediction-log record behind them.
    impressions = {}
    for rec in consume_all(settings, settings.topics.impressions, len(truth)):
        try:
            imp = decode(Impression, rec.value, rec.headers)
        except InvalidEvent:
            continue  # the simulator's deliberately malformed share
        impressions[imp.impression_id] = imp
    assert len(impressions) > 0.95 * len(truth)
    assert all(i.model_version == version and i.feature_ref == i.impression_id for i in impressions.values())

    # Frequency caps: no user saw one campaign more than twice in the (single) day.
    assert truth.groupby(["user_id", "campaign_id"]).size().max() <= 2
    # A/A: both arms served by the same model: no significant lift in CTR.
    result = analyze(truth.assign(converted=truth["converts"]), control="A")
    ctr = [x for x in result["lifts"] if x["metric"] == "ctr"]
    assert len(ctr) == 1 and not ctr[0]["significant"], ctr
