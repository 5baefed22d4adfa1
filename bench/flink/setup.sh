#!/usr/bin/env bash
# Apache Flink for the joiner benchmark's Flink row (bench/flink_join.py, bench/flink_row.py):
#  1. PyFlink in its own venv, .venv-flink (python3.11): its numpy/pandas/pyarrow pins clash with the project's.
#  2. Flink's Kafka SQL connector from Maven Central into infra/flink/lib (infra/flink/pom.xml).
# Idempotent: a second run only checks. Costs about 850 MiB of disk (the venv) + 10 MiB (the jar).
# FLINK_VENV / FLINK_LIB override the two destinations (relative to the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${FLINK_VENV:-.venv-flink}"
LIB="${FLINK_LIB:-infra/flink/lib}"
PYTHON="${FLINK_BASE_PYTHON:-python3.11}"
FLINK_VERSION=2.3.0

for tool in "$PYTHON" java mvn; do
  command -v "$tool" >/dev/null || { echo "flink: $tool not found" >&2; exit 1; }
done

if "$VENV/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('apache-flink') != '$FLINK_VERSION')" \
    2>/dev/null; then
  echo "flink: $VENV has apache-flink $FLINK_VERSION"
else
  echo "flink: creating $VENV ($($PYTHON --version)) with apache-flink==$FLINK_VERSION (~850 MiB, a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The versions this was verified with (what apache-flink 2.3.0's own ranges resolved to).
  "$VENV/bin/python" -m pip install -q "apache-flink==$FLINK_VERSION" -c /dev/stdin <<EOF
apache-flink-libraries==$FLINK_VERSION
apache-beam==2.61.0
py4j==0.10.9.7
numpy==2.1.3
pandas==2.2.3
pyarrow==16.1.0
EOF
  "$VENV/bin/python" -c "import pyflink.table; print('flink: pyflink imports')"
fi

CONNECTOR=$(sed -n 's:.*<flink.kafka.connector.version>\(.*\)</flink.kafka.connector.version>.*:\1:p' \
  infra/flink/pom.xml)
JAR="$LIB/flink-sql-connector-kafka-$CONNECTOR.jar"
if [ -f "$JAR" ]; then
  echo "flink: $JAR present"
else
  echo "flink: gathering flink-sql-connector-kafka $CONNECTOR from Maven Central into $LIB"
  mkdir -p "$LIB"
  rm -f "$LIB"/flink-sql-connector-kafka-*.jar  # another version's
  mvn -q -B -Dstyle.color=never -f infra/flink/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$(cd "$LIB" && pwd)"
fi
echo "flink: ready: $VENV/bin/python, $(ls "$LIB" | wc -l) jar(s) in $LIB: $(ls "$LIB" | tr '\n' ' ')"
