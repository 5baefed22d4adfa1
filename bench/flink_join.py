"""Apache Flink's SQL interval join of the impressions and clicks topics: the frontier row of the joiner
benchmark. Runs in the separate venv ``.venv-flink`` (PyFlink pins its own numpy/pandas/pyarrow), so it
imports nothing from the project:

    .venv-flink/bin/python bench/flink_join.py --bootstrap 127.0.0.1:19092 --impressions T1 --clicks T2 \\
        --output T3 --jar infra/flink/lib/flink-sql-connector-kafka-4.0.1-2.0.jar

A bounded read (earliest to latest offsets) of both topics, event time from ``event_time_ms`` with a
10-minute watermark, impressions LEFT JOIN clicks within 30 s, written to Kafka as JSON. Prints one JSON
line: the job's wall seconds from submit to end (start-up included).
"""

from __future__ import annotations

import argparse
import json
import time


def source(name: str, topic: str, columns: str, bootstrap: str, group: str) -> str:
    return f"""CREATE TABLE {name} ({columns},
        ts AS TO_TIMESTAMP_LTZ(COALESCE(event_time_ms, 0), 3),
        WATERMARK FOR ts AS ts - INTERVAL '10' MINUTE
    ) WITH ('connector' = 'kafka', 'topic' = '{topic}', 'properties.bootstrap.servers' = '{bootstrap}',
        'properties.group.id' = '{group}', 'scan.startup.mode' = 'earliest-offset',
        'scan.bounded.mode' = 'latest-offset', 'format' = 'json', 'json.ignore-parse-errors' = 'true',
        'json.fail-on-missing-field' = 'false')"""


def main() -> None:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--impressions", required=True)
    p.add_argument("--clicks", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--jar", required=True)
    p.add_argument("--parallelism", type=int, default=2)
    a = p.parse_args()
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    conf = env.get_config()
    conf.set("pipeline.jars", f"file://{a.jar}")
    conf.set("parallelism.default", str(a.parallelism))
    conf.set("table.exec.resource.default-parallelism", str(a.parallelism))
    group = f"flink-bench-{int(time.time())}"
    env.execute_sql(source("impressions", a.impressions, "impression_id STRING, event_time_ms BIGINT",
                           a.bootstrap, group))
    env.execute_sql(source("clicks", a.clicks, "click_id STRING, impression_id STRING, event_time_ms BIGINT",
                           a.bootstrap, group))
    env.execute_sql(f"""CREATE TABLE joined (impression_id STRING, clicked BOOLEAN, click_time_ms BIGINT)
        WITH ('connector' = 'kafka', 'topic' = '{a.output}', 'properties.bootstrap.servers' = '{a.bootstrap}',
        'format' = 'json')""")
    t0 = time.perf_counter()
    env.execute_sql("""INSERT INTO joined
        SELECT i.impression_id, c.impression_id IS NOT NULL, c.event_time_ms
        FROM (SELECT * FROM impressions WHERE impression_id IS NOT NULL AND event_time_ms >= 0) i
        LEFT JOIN (SELECT * FROM clicks WHERE impression_id IS NOT NULL AND event_time_ms >= 0) c
        ON i.impression_id = c.impression_id AND c.ts BETWEEN i.ts AND i.ts + INTERVAL '30' SECOND""").wait()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
