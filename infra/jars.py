"""Gather the JVM jars from Maven Central with mvn: the Kafka broker's and the ones Spark needs.

``python -m infra.jars`` fetches what is missing; a second run does nothing. Each jar set is resolved
from its own pom.xml (infra/kafka, infra/spark) into its own lib/ folder: the broker's scala-library and
logging binding must never reach Spark's classpath.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from infra.settings import ROOT, get_settings

_VERSIONED = re.compile(r"^(?P<artifact>.+?)-\d[\w.\-]*\.jar$")


def _artifact(jar: Path) -> str:
    match = _VERSIONED.match(jar.name)
    return match["artifact"] if match else jar.stem


def _mvn_copy(pom_dir: Path, out_dir: Path) -> None:
    print(f"resolving jars of {pom_dir.relative_to(ROOT)}/pom.xml with mvn -> {out_dir}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mvn", "-q", "-B", "-f", str(pom_dir / "pom.xml"), "dependency:copy-dependencies",
                    "-DincludeScope=runtime", f"-DoutputDirectory={out_dir}"], check=True)


def _prune_against_pyspark(out_dir: Path) -> list[str]:
    """Drop jars whose artifact pyspark already ships (scala, slf4j, jackson, hadoop, parquet, ...)."""
    import pyspark

    shipped = {_artifact(j) for j in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    dropped = []
    for jar in out_dir.glob("*.jar"):
        artifact = _artifact(jar)
        if artifact in shipped or artifact.startswith("log4j-"):
            jar.unlink()
            dropped.append(artifact)
    return sorted(dropped)


def _ready(out_dir: Path) -> bool:
    return (out_dir / ".complete").exists()


def ensure_kafka_jars() -> Path:
    out = get_settings().kafka_jar_dir
    if not _ready(out):
        _mvn_copy(ROOT / "infra" / "kafka", out)
        (out / ".complete").write_text("ok\n")
    return out


def ensure_spark_jars() -> Path:
    out = get_settings().spark_jar_dir
    if not _ready(out):
        _mvn_copy(ROOT / "infra" / "spark", out)
        dropped = _prune_against_pyspark(out)
        print(f"left out {len(dropped)} jars pyspark already ships", flush=True)
        (out / ".complete").write_text("ok\n")
    return out


def main() -> int:
    for path in (ensure_kafka_jars(), ensure_spark_jars()):
        print(f"{path}: {len(list(path.glob('*.jar')))} jars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
