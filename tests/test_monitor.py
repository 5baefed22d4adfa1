"""The monitoring report end to end on real Kafka topics, Redis and a registry folder: a few hundred records give
an HTML report and a summary with every section (and the A/B report's runtime reads the same topics); empty inputs
give "no data" sections, not a failure."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import numpy as np
import torch

from batch_jobs import ab_report, monitor
from feature_repo.online import OnlineWriter
from schemas.codec import encode
from schemas.events import DeadLetter, MaturedLabel, PredictionLog, TrainingExample
from schemas.features import ALL_TABLES
from trainers.circuit_breaker import reference_distribution
from trainers.registry import Registry

T0 = 1_790_000_000_000


def send_all(settings, records: list[tuple[str, object]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all", retries=10)
    futures = []
    for topic, record in records:
        if isinstance(record, bytes):
            futures.append(producer.send(topic, key=b"k", value=record))
            continue
        key, value, headers = encode(record)
        futures.append(producer.send(topic, key=key, value=value, headers=headers))
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()


def feature_row(table, keys: dict, ts: datetime) -> dict:
    row = {**keys, "event_timestamp": ts}
    for name in table.feature_names():
        kind = table.model_fields[name].annotation
        row[name] = 0.0 if kind is float else 0 if kind is int else []
    return row


def fill_inputs(settings) -> str:
    rng = np.random.default_rng(0)
    registry = Registry(settings.registry_dir)
    ref = reference_distribution({"ctr": rng.beta(2, 30, 5000), "cvr": rng.beta(2, 10, 5000)},
                                 rng.random(5000) < 0.06, rng.random(5000) < 0.1)
    version = registry.register({"w": torch.zeros(1)}, {"reference": ref}, cadence="full")
    registry.promote(version, reason="test")
    t, records = settings.topics, []
    for i in range(300):
        when = T0 + i * 36_000  # three hours of event time
        version_i = version if i % 3 else "sim-replay"  # a version the registry does not know
        pctr, pcvr = float(rng.beta(2, 30)), float(rng.beta(2, 10))
        imp = f"imp-{i}"
        records.append((t.prediction_log, PredictionLog(
            request_id=f"r{i}", impression_id=imp, user_id=i % 20, ad_id=100 + i % 50, model_version=version_i,
            event_time_ms=when, features={}, pctr=pctr, pcvr=pcvr, advertiser_id=i % 5, category_id=i % 4,
            explored=i % 50 == 0, arm="control" if i % 2 else "treatment", price=1.5)))
        clicked = bool(rng.random() < pctr)
        base = {"impression_id": imp, "user_id": i % 20, "ad_id": 100 + i % 50, "advertiser_id": i % 5,
                "campaign_id": 0, "impression_time_ms": when, "clicked": clicked}
        if i < 250:
            records.append((t.training_examples, TrainingExample(
                **base, example_id=f"{imp}/x", placement="feed", position=0, device="ios", model_version=version_i,
                converted=False, scheme="fnw", label_ctr=float(clicked), label_ctcvr=0.0, weight=1.0,
                as_of_ms=when + (4000 if clicked else 30_000))))
        if i < 150:
            records.append((t.matured_labels, MaturedLabel(**base, converted=clicked and rng.random() < 0.2)))
    records += [(t.impressions, b"{}")] * 40
    for i in range(4):
        records.append((t.dead_letters, DeadLetter(
            dead_letter_id=f"validate/x/0/{i}", source_topic=t.impressions, partition=0, offset=i, stage="validate",
            reason="not JSON: oops" if i % 2 else "invalid impression: user_id", payload="{", arrival_ms=T0)))
    send_all(settings, records)
    writer = OnlineWriter(settings)
    ts = datetime.fromtimestamp((T0 - 3_600_000) / 1000, UTC)
    for table in ALL_TABLES:
        keys = {"user_id": list(range(20)), "ad_id": list(range(100, 150)), "advertiser_id": list(range(5)),
                "category_id": list(range(4))}
        if table.ENTITIES == ("user_id", "category_id"):
            rows = [feature_row(table, {"user_id": u, "category_id": c}, ts) for u in range(20) for c in range(4)]
        else:
            rows = [feature_row(table, {table.ENTITIES[0]: k}, ts) for k in keys[table.ENTITIES[0]]]
        writer.write(table, rows)
    (settings.var_dir / "serving").mkdir(parents=True)
    (settings.var_dir / "serving" / "metrics.json").write_text(json.dumps(
        {"requests": 1200, "latency_ms": {"p50": 2.1, "p99": 7.9}, "dropped_logs": 0}))
    return version


def test_monitor_report_has_every_section(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path, "feast_project": f"t{uuid.uuid4().hex[:8]}"})
    version = fill_inputs(settings)
    summary = monitor.run(settings)

    assert (tmp_path / "monitor" / "report.html").stat().st_size > 10_000  # with embedded plots
    assert json.loads((tmp_path / "monitor" / "summary.json").read_text()) == summary
    for name in monitor.SECTIONS:
        assert summary[name]["status"] == "ok", (name, summary[name])
    assert summary["inputs"] == {"prediction_log": 300, "matured_labels": 150, "training_examples": 250,
                                 "dead_letters": 4}
    shift = {row["version"]: row for row in summary["prediction_shift"]["versions"]}
    assert shift[version]["impressions"] == 200 and shift[version]["psi_ctr"] < 0.25
    assert shift["sim-replay"]["psi_ctr"] is None
    assert summary["calibration"]["per_version"][version]["ctr"]["n"] > 0
    fresh = summary["feature_freshness"]["views"]
    assert fresh["user_features"]["found"] == fresh["user_features"]["looked_up"] > 0
    assert 3600 <= fresh["ad_features"]["age_s"]["p50"] <= 3 * 3600 + 3600
    lag = summary["label_join_lag"]
    assert lag["event_time_delay_s"]["first_training_example"]["max"] == 30.0
    assert lag["coverage"]["with_a_matured_label"] == 0.5
    assert summary["dead_letters"]["by_source"][settings.topics.impressions] == {"dead_letters": 4, "rate": 0.1}
    assert summary["scoring_latency"]["latency"]["latency_ms.p99"] == 7.9
    assert summary["circuit_breaker"]["promoted"] == version
    assert summary["circuit_breaker"]["verdict"]["decision"] == "no decision"  # 196 < 2,000 impressions

    # The A/B report's runtime on the same topics: arms from the log, labels from the joiner's outputs.
    ab = ab_report.run(settings)
    assert (tmp_path / "ab" / "report.html").exists()
    assert ab["counts"] == {"logged": 300, "pending_labels": 50}
    assert {a["arm"]: a["impressions"] for a in ab["arms"]} == {"control": 125, "treatment": 125}
    assert {(r["arm"], r["metric"]) for r in ab["lifts"]} == {("treatment", m) for m in ("ctr", "cvr", "rpm")}


def test_monitor_without_inputs_says_no_data(fresh_topics, tmp_path):
    settings = fresh_topics.model_copy(update={"var_dir": tmp_path})
    summary = monitor.run(settings)
    assert (tmp_path / "monitor" / "report.html").exists()
    assert {summary[name]["status"] for name in monitor.SECTIONS} == {"no data"}
