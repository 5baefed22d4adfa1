"""Data-quality reports for lakehouse partitions, with great-expectations (GX Core 1.x).

``python -m batch_jobs.quality --table gold/user_features --ds 2026-11-15`` validates one day of a Delta table
under ``<lake>/<table>`` and prints the verdict and the HTML report (GX data docs) a person opens.

The suites are derived from the schemas (``schemas.constraints``), never from a second list of fields: every
column of the model must exist, required columns hold no nulls, bounds become between-expectations and
string lengths length-expectations. These schema expectations are *critical*. A job may add
:class:`DistributionCheck` s (label rate, null share, value range, freshness), critical or not.

:func:`guard` is the audit of write-audit-publish: silver, gold and the training sets run it on the frame they
are about to write and publish (write) it only when it passes, so a failed day never reaches a reader (Feast
included). On a critical failure it records a quarantine (with the reasons and the report) and raises
:class:`QualityError`. Bronze lands every record whatever the checks say (it is the raw landing); its
quarantined days are kept and marked, and :func:`batch_jobs.bronze.read_bronze` leaves them out. The quarantine
state is a Delta table, ``<lake>/_quality/quarantine`` (one row per quarantine or release; the newest decides),
so it lives with the lake rather than on one machine's disk (:func:`is_quarantined`, :func:`quarantined_days`,
:func:`release`).

The GX project (suites, validation definitions, checkpoints, results, data docs) lives in
``<var>/quality/gx``; suites and checkpoints are named after the table with ``/`` written as ``.``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel

from infra.settings import Settings, get_settings
from schemas.constraints import Constraint, constraints
from schemas.events import Campaign, Click, Conversion, Impression, LabeledImpression, NegativeFeedback
from schemas.features import BY_VIEW, TrainingRow

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # before great_expectations is imported (lazily)

DATA_SOURCE = "lake"
CHECK_KINDS = ("mean_between", "null_share_at_most", "between", "max_at_least", "rows_between")
# Spark types (pyspark.sql.types class names) accepted for each constraint kind.
SPARK_TYPES: dict[str, list[str]] = {
    "str": ["StringType", "VarcharType", "CharType"],
    "int": ["LongType", "IntegerType", "ShortType", "ByteType"],
    "float": ["DoubleType", "FloatType", "DecimalType"],
    "bool": ["BooleanType"],
    "timestamp": ["TimestampType", "TimestampNTZType"],
    "list": ["ArrayType"],
    "map": ["MapType"],
}
MODELS: dict[str, type[BaseModel]] = {
    "bronze/impressions": Impression,
    "bronze/clicks": Click,
    "bronze/conversions": Conversion,
    "bronze/negative_feedback": NegativeFeedback,
    "bronze/campaigns": Campaign,
    "silver/labeled_impressions": LabeledImpression,
    "training/training_set": TrainingRow,
    **{f"gold/{view}": model for view, model in BY_VIEW.items()},
}


class QualityError(RuntimeError):
    """A partition failed a critical expectation (the message names each, and the report)."""


@dataclass(frozen=True)
class DistributionCheck:
    """A non-schema check on a partition: label rate, null rate, value range or freshness.

    ``mean_between``: min <= mean <= max (a boolean column as 0/1); ``null_share_at_most``: share of nulls <= max;
    ``between``: every value within [min, max]; ``max_at_least``: newest value >= min (epoch seconds for a
    timestamp column); ``rows_between``: the partition's row count within [min, max] (``column`` unused: the
    volume check, see :func:`volume_check`).
    """

    column: str
    kind: str
    min: float | None = None
    max: float | None = None
    critical: bool = False

    def __post_init__(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"unknown check kind {self.kind!r}; one of {CHECK_KINDS}")


@dataclass(frozen=True)
class QualityResult:
    """The verdict on one partition: ``passed`` unless a critical expectation failed.

    ``failures`` has one line per failed expectation, critical ones first; ``warnings`` repeats the
    non-critical ones (they never block downstream)."""

    table: str
    ds: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    report_path: Path = Path()

    def summary(self) -> str:
        lines = [f"{self.table} ds={self.ds}: {'PASSED' if self.passed else 'FAILED'}"]
        lines += [f"  - {f}" for f in self.failures]
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


def gx_name(table: str) -> str:
    """The GX name of a table's suite, asset and checkpoint (GX stores names as file names)."""
    return table.replace("/", ".")


def _bounds(c: Constraint) -> dict:
    low = c.ge if c.ge is not None else c.gt
    high = c.le if c.le is not None else c.lt
    return {"min_value": low, "max_value": high, "strict_min": c.gt is not None, "strict_max": c.lt is not None}


def expectations_for(model: type[BaseModel]) -> list:
    """Critical GX expectations for every constraint of ``model``: the column exists and has a matching Spark
    type, required columns hold no nulls, numeric bounds hold, strings are long enough, a ``Literal`` field holds
    one of its values."""
    import great_expectations.expectations as gxe

    out: list = []
    for c in constraints(model):
        crit = {"column": c.column, "severity": "critical", "meta": {"rule": c.describe()}}
        out.append(gxe.ExpectColumnToExist(**crit))
        out.append(gxe.ExpectColumnValuesToBeInTypeList(type_list=SPARK_TYPES[c.kind], **crit))
        if c.required:
            out.append(gxe.ExpectColumnValuesToNotBeNull(**crit))
        if c.kind in ("int", "float") and any(v is not None for v in (c.ge, c.gt, c.le, c.lt)):
            out.append(gxe.ExpectColumnValuesToBeBetween(**_bounds(c), **crit))
        if c.kind == "str" and (c.min_length is not None or c.max_length is not None):
            out.append(gxe.ExpectColumnValueLengthsToBeBetween(min_value=c.min_length, max_value=c.max_length,
                                                               **crit))
        if c.values is not None:
            out.append(gxe.ExpectColumnValuesToBeInSet(value_set=list(c.values), **crit))
    return out


def _check_expectation(check: DistributionCheck, model: type[BaseModel]):
    """The GX expectation of one :class:`DistributionCheck`."""
    import great_expectations.expectations as gxe

    severity = "critical" if check.critical else "warning"
    if check.kind == "rows_between":
        return gxe.ExpectTableRowCountToBeBetween(min_value=check.min, max_value=check.max, severity=severity,
                                                  meta={"check": check.kind})
    common = {"column": check.column, "severity": severity, "meta": {"check": check.kind}}
    if check.kind == "mean_between":
        kinds = {c.column: c.kind for c in constraints(model)}
        column = as_number(check.column) if kinds.get(check.column) == "bool" else check.column
        return gxe.ExpectColumnMeanToBeBetween(min_value=check.min, max_value=check.max,
                                               **{**common, "column": column})
    if check.kind == "null_share_at_most":
        return gxe.ExpectColumnProportionOfNonNullValuesToBeBetween(min_value=1.0 - (check.max or 0.0), **common)
    if check.kind == "between":
        return gxe.ExpectColumnValuesToBeBetween(min_value=check.min, max_value=check.max, **common)
    kinds = {c.column: c.kind for c in constraints(model)}
    newest = check.min
    if kinds.get(check.column) == "timestamp" and newest is not None:
        newest = datetime.fromtimestamp(newest, UTC)
    return gxe.ExpectColumnMaxToBeBetween(min_value=newest, **common)


def as_number(column: str) -> str:
    """The 0/1 column :func:`check_partition` adds for a boolean column's mean (GX on Spark cannot average a
    boolean: the expectation errors, and an error is not a verdict)."""
    return f"{column}__as_number"


def volume_check(counts: list[int], low: float = 0.5, high: float = 2.0,
                 min_days: int = 3) -> DistributionCheck | None:
    """A critical row-count check against the previous days' partitions (``counts``, newest last): between
    ``low`` and ``high`` times their median; None with fewer than ``min_days`` previous days.

    >>> volume_check([100, 120, 80]).min, volume_check([100, 120, 80]).max
    (50.0, 200.0)
    >>> volume_check([100]) is None
    True
    """
    counts = [c for c in counts if c > 0]
    if len(counts) < min_days:
        return None
    median = statistics.median(counts)
    return DistributionCheck("*", "rows_between", low * median, high * median, critical=True)


def previous_counts(frame, ds: str, days: int = 7) -> list[int]:
    """Row counts of the ``days`` partitions (``ds`` column) before ``ds`` in a table's frame, oldest first."""
    from pyspark.sql import functions as F

    rows = (frame.where(F.col("ds") < ds).groupBy("ds").count().orderBy(F.col("ds").desc()).limit(days).collect())
    return [int(r["count"]) for r in reversed(rows)]


def _context(settings: Settings):
    import great_expectations as gx

    root = settings.var_dir / "quality"
    root.mkdir(parents=True, exist_ok=True)
    return gx.get_context(mode="file", project_root_dir=str(root))


def _checkpoint(context, table: str, suite):
    """The table's dataframe asset, validation definition and checkpoint (which updates the data docs)."""
    import great_expectations as gx

    name = gx_name(table)
    source = context.data_sources.add_or_update_spark(name=DATA_SOURCE)
    try:
        asset = source.get_asset(name)
    except LookupError:
        asset = source.add_dataframe_asset(name=name)
    try:
        batch_def = asset.get_batch_definition("partition")
    except KeyError:
        batch_def = asset.add_batch_definition_whole_dataframe("partition")
    validation = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    return context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[validation], result_format="SUMMARY",
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")]))


def _describe(res) -> tuple[str, str, bool]:
    """(column, one line in words, critical?) for a failed expectation result."""
    from great_expectations.expectations.metadata_types import FailureSeverity

    cfg = res.expectation_config
    column = cfg.kwargs.get("column", "<table>")
    kwargs = {k: v for k, v in cfg.kwargs.items()
              if k not in ("column", "batch_id") and v is not None and v is not False}
    what = f"{column}: {cfg.type}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    result = res.result or {}
    if cfg.type == "expect_column_to_exist":
        detail = "the column is missing"
    elif (res.exception_info or {}).get("raised_exception"):
        detail = f"error: {str(res.exception_info.get('exception_message', ''))[:200]}"
    elif "unexpected_count" in result:
        examples = result.get("partial_unexpected_list", [])[:5]
        detail = f"{result['unexpected_count']} unexpected value(s), e.g. {examples}"
    else:
        detail = f"observed {result.get('observed_value')}"
    return column, f"{what}: {detail}", FailureSeverity(cfg.severity) == FailureSeverity.CRITICAL


def _report_path(context, identifier) -> Path:
    """The local data-docs page of this validation result, else the docs' index page."""
    for ref in (identifier, None):
        for site in context.get_docs_sites_urls(resource_identifier=ref):
            url = site.get("site_url") or ""
            path = Path(unquote(urlparse(url).path))
            if url.startswith("file://") and path.is_file():
                return path
    raise FileNotFoundError("no local data docs page was built")


def check_partition(frame, model: type[BaseModel], table: str, ds: str, settings: Settings,
                    checks: list[DistributionCheck] | tuple = ()) -> QualityResult:
    """Validate one partition (a Spark DataFrame) against ``model``'s suite plus ``checks``; build its report."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from pyspark.sql import functions as F

    kinds = {c.column: c.kind for c in constraints(model)}
    for check in checks:
        if check.kind == "mean_between" and kinds.get(check.column) == "bool":
            frame = frame.withColumn(as_number(check.column), F.col(check.column).cast("double"))
    context = _context(settings)
    suite = gx.ExpectationSuite(name=gx_name(table), meta={"model": model.__name__})
    for expectation in expectations_for(model) + [_check_expectation(c, model) for c in checks]:
        suite.add_expectation(expectation)
    suite = context.suites.add_or_update(suite)
    checkpoint = _checkpoint(context, table, suite)
    run = checkpoint.run(batch_parameters={"dataframe": frame},
                         run_id=RunIdentifier(run_name=f"{gx_name(table)}-{ds}", run_time=datetime.now(UTC)))
    identifier, validation = next(iter(run.run_results.items()))
    failed = [r for r in validation.results if not r.success]
    # A missing column fails every expectation on it: report it once.
    missing = {r.expectation_config.kwargs["column"] for r in failed
               if r.expectation_config.type == "expect_column_to_exist"}
    failed = [r for r in failed
              if r.expectation_config.kwargs.get("column") not in missing
              or r.expectation_config.type == "expect_column_to_exist"]
    described = [_describe(r) for r in failed]
    critical = [line for _, line, crit in described if crit]
    warnings = [line for _, line, crit in described if not crit]
    return QualityResult(table=table, ds=ds, passed=not critical, failures=critical + warnings, warnings=warnings,
                         report_path=_report_path(context, identifier))


QUARANTINE_COLUMNS = "table STRING, ds STRING, action STRING, reasons ARRAY<STRING>, report_path STRING, at_ms LONG"


def quarantine_path(settings: Settings) -> str:
    return str(settings.lake_dir / "_quality" / "quarantine")


def _spark(settings: Settings):
    from infra.spark_session import spark_session

    return spark_session("quality", settings)


def _record(settings: Settings, table: str, ds: str, action: str, reasons: list[str],
            report_path: Path | None) -> None:
    spark = _spark(settings)
    row = (table, ds, action, list(reasons), str(report_path) if report_path else None,
           int(datetime.now(UTC).timestamp() * 1000))
    spark.createDataFrame([row], QUARANTINE_COLUMNS).write.format("delta").mode("append").save(
        quarantine_path(settings))


def quarantine(settings: Settings, table: str, ds: str, reasons: list[str], *,
               report_path: Path | None = None) -> str:
    """Mark ``table``'s day ``ds`` as quarantined (readers skip it); returns where the state lives."""
    _record(settings, table, ds, "quarantine", reasons, report_path)
    return quarantine_path(settings)


def quarantine_state(settings: Settings, spark=None) -> dict[str, set[str]]:
    """Per table, the days whose newest quarantine record is a quarantine (not a release): one read of the
    state, for a job that checks several tables."""
    from delta.tables import DeltaTable
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark, path = spark or _spark(settings), quarantine_path(settings)
    if not DeltaTable.isDeltaTable(spark, path):
        return {}
    newest = Window.partitionBy("table", "ds").orderBy(F.col("at_ms").desc())
    rows = (spark.read.format("delta").load(path)
            .withColumn("rank", F.row_number().over(newest)).where("rank = 1 AND action = 'quarantine'")
            .select("table", "ds").collect())
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["table"], set()).add(r["ds"])
    return out


def quarantined_days(settings: Settings, table: str, spark=None) -> set[str]:
    """The days of ``table`` whose newest quarantine record is a quarantine (not a release)."""
    return quarantine_state(settings, spark).get(table, set())


def is_quarantined(settings: Settings, table: str, ds: str) -> bool:
    return ds in quarantined_days(settings, table)


def release(settings: Settings, table: str, ds: str) -> None:
    """Lift the quarantine of a day (after a person fixed or accepted it)."""
    _record(settings, table, ds, "release", [], None)


def guard(frame, model: type[BaseModel], table: str, ds: str, settings: Settings,
          checks: list[DistributionCheck] | tuple = ()) -> QualityResult:
    """:func:`check_partition`; on a critical failure quarantine the day and raise :class:`QualityError`."""
    result = check_partition(frame, model, table, ds, settings, checks)
    if not result.passed:
        critical = [f for f in result.failures if f not in result.warnings]
        marker = quarantine(settings, table, ds, critical, report_path=result.report_path)
        raise QualityError(f"{table} ds={ds} failed {len(critical)} critical expectation(s):\n"
                           + "\n".join(f"  - {f}" for f in critical)
                           + f"\nreport: {result.report_path}\nquarantined: recorded in {marker}")
    return result


def model_for(table: str) -> type[BaseModel]:
    """The schema of a lake table (``bronze/impressions``, ``gold/<view>``, ...)."""
    if table not in MODELS:
        raise KeyError(f"no schema known for table {table!r}; known: {sorted(MODELS)}")
    return MODELS[table]


def main(argv: list[str] | None = None) -> int:
    """Validate one day of a Delta table; exit 1 (and quarantine the day) on a critical failure."""
    from pyspark.sql import functions as F

    from infra.spark_session import spark_session

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", required=True, help="table under the lake, e.g. gold/user_features")
    parser.add_argument("--ds", required=True, help="day, YYYY-MM-DD")
    args = parser.parse_args(argv)
    settings = get_settings()
    model = model_for(args.table)
    spark = spark_session(f"quality-{gx_name(args.table)}", settings)
    frame = spark.read.format("delta").load(str(settings.lake_dir / args.table)).where(F.col("ds") == F.lit(args.ds))
    if frame.isEmpty():
        print(f"{args.table} ds={args.ds}: no rows", file=sys.stderr)
        return 1
    try:
        result = guard(frame, model, args.table, args.ds, settings)
    except QualityError as err:
        print(err, file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
