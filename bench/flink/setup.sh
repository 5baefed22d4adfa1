#!/usr/bin/env bash
# Apache Flink for the joiner benchmark: PyFlink in its own venv (.venv-flink: its numpy/pandas/pyarrow pins
# clash with the project's) and Flink's Kafka SQL connector from Maven Central into infra/flink/lib.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv-flink/bin/python ] || ! .venv-flink/bin/python -c 'import pyflink' 2>/dev/null; then
  echo "flink: installing apache-flink==2.3.0 into .venv-flink (a few minutes)"
  python3 -m venv .venv-flink
  .venv-flink/bin/pip install -q apache-flink==2.3.0
fi
if ! ls infra/flink/lib/flink-sql-connector-kafka-*.jar >/dev/null 2>&1; then
  echo "flink: gathering the Kafka SQL connector from Maven Central"
  (cd infra/flink && mvn -q dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime)
fi
echo "flink: ready ($(ls infra/flink/lib | wc -l) jars in infra/flink/lib)"
