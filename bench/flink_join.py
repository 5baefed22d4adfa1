"""Apache Flink's SQL interval join of the impressions and clicks topics: the frontier row of the joiner
benchmark. Runs in the separate venv ``.venv-flink`` (PyFlink pins its own numpy/pandas/pyarrow), so it
imports nothing from the project:

    .venv-flink/bin/python bench/flink_join.py --bootstrap 127.0.0.1:19092 --impressions T1 --clicks T2 \\
        --output T3 --parallelism 2

A bounded read (earliest to latest offsets) of both topics, event time from ``event_time_ms`` with a
10-minute watermark, impressions LEFT JOIN clicks within 30 s, written to Kafka as JSON, on a local
mini-cluster. Malformed payloads are skipped: unparsable or wrongly typed (``json.ignore-parse-errors``) or
failing the schema's checks (filtered). Prints one JSON line: ``events_in`` (records in both input topics'
bounded ranges), ``rows_out`` (records the job added to the output topic), ``seconds`` (submit to end,
start-up included), ``startup_s`` (submit until the job was RUNNING), ``first_row_s`` (submit until the
first output record).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

LIB = Path(__file__).resolve().parent.parent / "infra" / "flink" / "lib"
# kafka-clients as shaded inside flink-sql-connector-kafka: used here only to read the topics' offsets.
SHADED = "org.apache.flink.kafka.shaded.org.apache.kafka"
IMPRESSION_COLUMNS = """impression_id STRING, request_id STRING, user_id BIGINT, ad_id BIGINT,
    advertiser_id BIGINT, campaign_id BIGINT, placement STRING, `position` INT, device STRING, bid DOUBLE,
    event_time_ms BIGINT, model_version STRING, served_pctr DOUBLE, served_pcvr DOUBLE, feature_ref STRING"""
CLICK_COLUMNS = "click_id STRING, impression_id STRING, user_id BIGINT, ad_id BIGINT, event_time_ms BIGINT"
TERMINAL = {"FINISHED", "FAILED", "CANCELED"}


def source_ddl(name: str, topic: str, columns: str, bootstrap: str, group: str) -> str:
    """A bounded Kafka JSON source with event time ``ts`` from ``event_time_ms`` and a 10-minute watermark."""
    return f"""CREATE TABLE {name} ({columns},
        ts AS TO_TIMESTAMP_LTZ(COALESCE(event_time_ms, 0), 3),
        WATERMARK FOR ts AS ts - INTERVAL '10' MINUTE
    ) WITH ('connector' = 'kafka', 'topic' = '{topic}', 'properties.bootstrap.servers' = '{bootstrap}',
        'properties.group.id' = '{group}', 'scan.startup.mode' = 'earliest-offset',
        'scan.bounded.mode' = 'latest-offset', 'format' = 'json', 'json.ignore-parse-errors' = 'true',
        'json.fail-on-missing-field' = 'false')"""


def sink_ddl(topic: str, bootstrap: str) -> str:
    """The output topic: JSON values keyed by impression_id."""
    return f"""CREATE TABLE joined (impression_id STRING, clicked BOOLEAN, click_time_ms BIGINT)
    WITH ('connector' = 'kafka', 'topic' = '{topic}', 'properties.bootstrap.servers' = '{bootstrap}',
        'key.format' = 'raw', 'key.fields' = 'impression_id', 'value.format' = 'json',
        'value.fields-include' = 'ALL', 'sink.delivery-guarantee' = 'at-least-once')"""


# The checks every consumer of these topics applies (schemas/events.py): referencing every field also makes
# the JSON format decode it, so a wrongly typed field drops the record (projection push-down skips the rest).
VALID_IMPRESSION = """impression_id <> '' AND request_id <> '' AND user_id >= 0 AND ad_id >= 0
    AND advertiser_id >= 0 AND campaign_id >= 0 AND placement <> '' AND `position` BETWEEN 0 AND 100
    AND device <> '' AND bid >= 0 AND event_time_ms >= 0 AND model_version IS NOT NULL
    AND served_pctr BETWEEN 0 AND 1 AND served_pcvr BETWEEN 0 AND 1 AND feature_ref IS NOT NULL"""
VALID_CLICK = "click_id <> '' AND impression_id <> '' AND user_id >= 0 AND ad_id >= 0 AND event_time_ms >= 0"
MINIMAL = "impression_id <> '' AND event_time_ms >= 0"


def join_sql(validate: bool) -> str:
    """impressions LEFT JOIN clicks within 30 s of event time, into ``joined``."""
    imp, click = (VALID_IMPRESSION, VALID_CLICK) if validate else (MINIMAL, MINIMAL)
    return f"""INSERT INTO joined
    SELECT i.impression_id, c.impression_id IS NOT NULL, c.event_time_ms
    FROM (SELECT impression_id, event_time_ms, ts FROM impressions WHERE {imp}) i
    LEFT JOIN (SELECT impression_id, event_time_ms, ts FROM clicks WHERE {click}) c
    ON i.impression_id = c.impression_id AND c.ts BETWEEN i.ts AND i.ts + INTERVAL '30' SECOND"""


class Offsets:
    """Sums of end (or begin) offsets of topics, through the connector's shaded Kafka consumer in the JVM."""

    def __init__(self, bootstrap: str) -> None:
        from pyflink.java_gateway import get_gateway

        self.jvm = get_gateway().jvm
        props = self.jvm.java.util.Properties()
        props.setProperty("bootstrap.servers", bootstrap)
        deser = f"{SHADED}.common.serialization.ByteArrayDeserializer"
        props.setProperty("key.deserializer", deser)
        props.setProperty("value.deserializer", deser)
        self.consumer = getattr(self.jvm, f"{SHADED}.clients.consumer.KafkaConsumer")(props)
        self.parts: dict[str, Any] = {}

    def _partitions(self, topic: str) -> Any:
        """The topic's partitions, as a Java list of TopicPartition."""
        if topic not in self.parts:
            parts = self.jvm.java.util.ArrayList()
            for info in self.consumer.partitionsFor(topic):
                parts.add(getattr(self.jvm, f"{SHADED}.common.TopicPartition")(topic, info.partition()))
            self.parts[topic] = parts
        return self.parts[topic]

    def total(self, topic: str, end: bool = True) -> int:
        """Sum of the end (or beginning) offsets over the topic's partitions."""
        parts = self._partitions(topic)
        found = self.consumer.endOffsets(parts) if end else self.consumer.beginningOffsets(parts)
        return sum(int(v) for v in found.values())

    def records(self, topic: str) -> int:
        """Records the topic holds now."""
        return self.total(topic) - self.total(topic, end=False)

    def close(self) -> None:
        self.consumer.close()


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Run the join job to its end; the result line's fields."""
    from pyflink.table import EnvironmentSettings, TableEnvironment

    jars = sorted(Path(j).resolve() for j in a.jar) if a.jar else sorted(LIB.glob("*.jar"))
    if not jars:
        raise SystemExit(f"no connector jar in {LIB}: run bench/flink/setup.sh")
    g0 = time.perf_counter()
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    conf = env.get_config()
    conf.set("pipeline.jars", ";".join(j.as_uri() for j in jars))
    conf.set("parallelism.default", str(a.parallelism))
    conf.set("table.exec.resource.default-parallelism", str(a.parallelism))
    conf.set("pipeline.name", "flink-interval-join-bench")
    gateway_s = time.perf_counter() - g0
    offsets = Offsets(a.bootstrap)
    events_in = offsets.records(a.impressions) + offsets.records(a.clicks)
    out_before = offsets.total(a.output)
    group = f"flink-bench-{uuid.uuid4().hex[:8]}"
    env.execute_sql(source_ddl("impressions", a.impressions, IMPRESSION_COLUMNS, a.bootstrap, group))
    env.execute_sql(source_ddl("clicks", a.clicks, CLICK_COLUMNS, a.bootstrap, group))
    env.execute_sql(sink_ddl(a.output, a.bootstrap))

    t0 = time.perf_counter()
    result = env.execute_sql(join_sql(not a.no_validate))
    submit_s = time.perf_counter() - t0
    client = result.get_job_client()
    startup_s = first_row_s = None
    while True:  # poll until the job runs and its first record is out, then block until it ends
        status = client.get_job_status().result().name
        now = time.perf_counter() - t0
        if startup_s is None and status in {"RUNNING"} | TERMINAL:
            startup_s = now
        if first_row_s is None and offsets.total(a.output) > out_before:
            first_row_s = now
        if status in TERMINAL or first_row_s is not None:
            break
        time.sleep(0.05)
    result.wait()
    seconds = time.perf_counter() - t0
    rows_out = offsets.total(a.output) - out_before
    offsets.close()
    return {"events_in": events_in, "rows_out": rows_out, "seconds": round(seconds, 3),
            "startup_s": startup_s and round(startup_s, 3), "first_row_s": first_row_s and round(first_row_s, 3),
            "submit_s": round(submit_s, 3), "gateway_s": round(gateway_s, 3), "job_id": str(client.get_job_id()),
            "parallelism": a.parallelism, "validated": not a.no_validate, "jars": [j.name for j in jars]}


def main() -> None:
    """Parse the arguments, run the job, print its result line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--impressions", required=True)
    p.add_argument("--clicks", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--parallelism", type=int, default=2)
    p.add_argument("--no-validate", action="store_true",
                   help="check only impression_id and event_time_ms (the other fields are then never decoded)")
    p.add_argument("--jar", action="append", help=f"connector jar(s); default: every jar in {LIB}")
    print(json.dumps(run(p.parse_args())), flush=True)


if __name__ == "__main__":
    main()
