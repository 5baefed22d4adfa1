"""The project's one SparkSession builder: Delta Lake and the Kafka source from infra/spark/lib."""

from __future__ import annotations

from infra.jars import ensure_spark_jars
from infra.settings import Settings, get_settings


def spark_session(app_name: str, settings: Settings | None = None):
    """A SparkSession with Delta's catalog and the Kafka connector on the classpath.

    Jars come from Maven Central through ``infra.jars`` (no Ivy download at session start), so the
    same code runs offline once ``make install`` has gathered them.
    """
    from pyspark.sql import SparkSession

    s = settings or get_settings()
    jars = sorted(str(p) for p in ensure_spark_jars().glob("*.jar"))
    s.var_dir.mkdir(parents=True, exist_ok=True)
    return (
        SparkSession.builder.appName(app_name)
        .master(s.spark.master)
        .config("spark.jars", ",".join(jars))
        .config("spark.driver.memory", s.spark.driver_memory)
        .config("spark.sql.shuffle.partitions", str(s.spark.shuffle_partitions))
        .config("spark.databricks.delta.snapshotPartitions", str(s.spark.delta_snapshot_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", str(s.var_dir / "spark-warehouse"))
        .config("spark.ui.enabled", "false")
        # The status store keeps every finished job, stage and SQL execution up to these counts (defaults 1,000
        # each) even with the UI off: in a long-lived driver (a stream job, a test session) that retained state
        # filled a 2g heap until a broadcast ran out of memory. Nothing here reads past runs from it.
        .config("spark.ui.retainedJobs", "100")
        .config("spark.ui.retainedStages", "100")
        .config("spark.sql.ui.retainedExecutions", "50")
        .getOrCreate()
    )
