"""``python -m feature_repo.materialize materialize-incremental END`` (``make materialize``, the crontab): gold
into Redis with our bulk loader, under the contract ``python -m feature_repo.cli materialize...`` gives Feast's.

The same arguments as ``feast materialize START END`` / ``feast materialize-incremental END`` (``--views``), the
same rules (``feature_repo.loads``): an interval holding a quarantined gold day is refused; each gold view loads
the latest row per entity among the ``event_timestamp`` values its table held in the interval before the load
ran; a row older than (or as old as) what Redis holds for its entity is skipped, as Feast's writer skips it; the
load is recorded once it succeeded (the time its rows became readable, which training joins on). An incremental
load starts at the view's previous recorded end. Feast reads what this writes (``get_online_features``:
``tests/test_materialize.py``). ``make bench-materialize``: 2.6x ``feast materialize`` end to end from the same
Delta table. With ``ADS_ONLINE_STORE=sqlite`` (an explicit local store) the command is Feast's.
"""

from __future__ import annotations

import subprocess
import sys

from feature_repo.bulk import bulk_write, newer_than_stored
from feature_repo.loads import (
    Materialization,
    QuarantinedDays,
    parse_materialize,
    record,
    refuse_quarantined,
    stamps_present,
)
from feature_repo.store import OnlineStoreDown, write_config
from infra.settings import Settings, get_settings
from schemas.features import BY_VIEW


def latest_rows(spark, path: str, entities: tuple[str, ...], stamps: list[int]):
    """The gold rows stamped with one of ``stamps`` (ms), the latest per entity, as pandas (no ``ds``)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = spark.read.format("delta").load(path).where(F.unix_millis(F.col("event_timestamp")).isin(stamps))
    latest = Window.partitionBy(*entities).orderBy(F.col("event_timestamp").desc())
    return rows.withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n", "ds").toPandas()


def materialize(settings: Settings, spec: Materialization, spark=None) -> dict[str, int]:
    """Load ``spec``'s gold views into the online store; returns the rows written per view."""
    from batch_jobs.gold import gold_path
    from infra.spark_session import spark_session

    write_config(settings, "redis")  # a loud OnlineStoreDown when Redis is not reachable, before any work
    spark = spark or spark_session("materialize", settings)
    present = stamps_present(spark, settings, spec)
    refuse_quarantined(settings, present, "feature_repo.materialize")
    written = {}
    for view, (_, stamps) in present.items():
        table = BY_VIEW[view]
        rows = latest_rows(spark, gold_path(settings, table), table.ENTITIES, stamps) if stamps else None
        fresh = newer_than_stored(settings, table, rows) if rows is not None else None
        written[view] = bulk_write(settings, table, fresh) if fresh is not None and len(fresh) else 0
        print(f"feature_repo.materialize: {view}: {written[view]:,} rows written "
              f"({len(stamps)} stamps in the interval)", flush=True)
    record(spark, settings, spec, present)
    return written


def command(args: list[str], settings: Settings) -> None:
    """Run one materialize command line (``feast``'s arguments): our loader into Redis; with an explicit SQLite
    online store, Feast's CLI (the bulk loader writes Redis only). Raises on failure (``QuarantinedDays``,
    ``OnlineStoreDown``, a failed Feast command); the demo and the chaos run load gold through this."""
    spec = parse_materialize(args)
    if spec is None:
        raise ValueError(f"not a materialize command: {' '.join(args)!r}")
    if settings.online_store != "redis":
        from feature_repo.cli import feast

        feast(args, settings)
        return
    materialize(settings, spec)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if parse_materialize(args) is None:
        print(__doc__)
        return 2
    try:
        command(args, get_settings())
    except (OnlineStoreDown, QuarantinedDays, subprocess.CalledProcessError) as exc:
        print(f"feature_repo.materialize: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
