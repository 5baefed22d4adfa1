"""Training/serving skew: the features serving logged, beside the same features recomputed from the lake.

``python -m batch_jobs.skew_report --start 2026-11-10 --end 2026-11-16 [--negative-rate 1.0] [--seed 7]``
joins, on ``impression_id``, the replay rows of the days (``batch_jobs.replay_set.build``: the logged
values) with the point-in-time rows of the same impressions (``batch_jobs.training_set.build``: recomputed
from gold and the real-time logs), and compares every model input and the served context, per column:

- rows compared; the share equal (null == null counts as equal; floats within a relative tolerance of
  1e-6, ints, strings and integer lists exactly, float lists element-wise with the float tolerance);
- the share null on one side only, split by side (logged-only null: serving had no value that the lake
  has, e.g. a stale online store; recomputed-only null: serving had a value the lake cannot rebuild);
- the mean and max absolute difference where both sides have a value (lists: the largest element
  difference per row), and a few example impressions of the most differing columns.

The recomputation joins each served impression on availability (``batch_jobs.training_set``: the rows written
before serving's logged reads, the ad and advertiser rows before its cache read them), so a worker's lag, a
late gold load or the read path's cache no longer differs. What may still differ in the real-time views: a row
the worker wrote in the milliseconds between a read's stamp and the read, or one whose log record was sent
well after its Redis write (the worker's transaction took long). ``ad_cache_age_ms`` in the summary says how
stale the cached ad-side rows were when served, beside the read path's documented staleness. The report lists
them with the rest and marks them, it does not hide them; the summary names the most differing columns
overall, and separately those of the batch views and the context
(``top_differing_batch``) and of the real-time views (``top_differing_realtime``), so the expected real-time
drift cannot crowd a batch skew out of sight.

Writes ``<var>/skew/<start>_<end>/summary.json`` and ``report.html``; nothing in them depends on the
wall clock, so a re-run over the same data writes the same files. ``--negative-rate`` below 1 compares the
impressions the training set would keep (same hash), which is cheaper on big days.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from datetime import date
from pathlib import Path

from batch_jobs import replay_set, training_set
from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from schemas.features import REALTIME_TABLES
from trainers.data import AFFINITY, HISTORY_COLUMN, PROFILE_COLUMN, InputSpec

REL_TOL = 1e-6
TOP = 10  # differing columns named in the summary
EXAMPLES = 3  # example impressions of each column named in the summary
CONTEXT = ("advertiser_id", "campaign_id", "category_id", "placement", "device", "position", "bid")
REALTIME_VIEWS = {t.VIEW for t in REALTIME_TABLES}
L, R = "logged::", "recomputed::"


def compared_columns() -> list[str]:
    """The model's inputs (dense columns but the derived affinity, history, profile), then the context."""
    dense = [c for c in InputSpec.from_schemas().dense_columns if c != AFFINITY]
    return [*dense, HISTORY_COLUMN, PROFILE_COLUMN, *CONTEXT]


def view_of(column: str) -> str:
    return column.split("__", 1)[0] if "__" in column else "context"


def kind_of(dtype) -> str:
    """float | int | str | bool | float_list | int_list."""
    from pyspark.sql import types as T

    if isinstance(dtype, T.ArrayType):
        return "float_list" if isinstance(dtype.elementType, (T.DoubleType, T.FloatType)) else "int_list"
    if isinstance(dtype, (T.DoubleType, T.FloatType)):
        return "float"
    if isinstance(dtype, T.StringType):
        return "str"
    if isinstance(dtype, T.BooleanType):
        return "bool"
    return "int"


def _close(a, b):
    """Spark: a and b (non-null doubles) equal within the relative tolerance."""
    from pyspark.sql import functions as F

    return (a == b) | (F.abs(a - b) <= F.lit(REL_TOL) * F.greatest(F.abs(a), F.abs(b)))


def equal_and_diff(a, b, kind: str):
    """(equal where both are non-null, absolute difference where both are non-null or null) as Columns."""
    from pyspark.sql import functions as F

    if kind == "float":
        return _close(a, b), F.abs(a - b)
    if kind == "int":
        return a == b, F.abs(a - b).cast("double")
    if kind in ("str", "bool"):
        return a == b, F.lit(None).cast("double")
    same_size = F.size(a) == F.size(b)
    elem_diff = F.array_max(F.zip_with(a, b, lambda x, y: F.abs(x.cast("double") - y.cast("double"))))
    diff = F.when(same_size, F.coalesce(elem_diff, F.lit(0.0)))
    if kind == "int_list":
        return a == b, diff
    elem_eq = F.forall(F.zip_with(a, b, lambda x, y: _close(x, y)), lambda e: e)
    return same_size & elem_eq, diff


def joined_rows(spark, settings: Settings, start: date, end: date, negative_rate: float, seed: int):
    """Replay rows (``logged::<c>`` columns) full-outer-joined with the PIT rows (``recomputed::<c>``) of
    the same impressions; ``__logged`` / ``__recomputed`` say which sides a row has."""
    from pyspark.sql import functions as F

    cols = compared_columns()
    logged = replay_set.build(spark, settings, start, end, negative_rate, seed)
    pit = training_set.build(spark, settings, start, end, negative_rate, seed)
    return (logged.select("impression_id", "model_version", F.lit(True).alias("__logged"),
                          *[F.col(c).alias(L + c) for c in cols])
            .join(pit.select("impression_id", F.lit(True).alias("__recomputed"),
                             *[F.col(c).alias(R + c) for c in cols]), "impression_id", "full_outer"))


def column_stats(both, cols: list[str]) -> list[dict]:
    """One Spark aggregation over the rows with both sides: per column, the counts and differences of the
    module docstring."""
    from pyspark.sql import functions as F

    def count(cond):
        return F.sum(F.when(cond, 1).otherwise(0))

    aggs = [F.count(F.lit(1)).alias("__n")]
    kinds = {}
    for i, c in enumerate(cols):
        a, b = F.col(f"`{L + c}`"), F.col(f"`{R + c}`")
        kinds[c] = kind_of(both.schema[L + c].dataType)
        eq, diff = equal_and_diff(a, b, kinds[c])
        present = a.isNotNull() & b.isNotNull()
        aggs += [count(a.isNull() & b.isNull()).alias(f"nn{i}"), count(present & eq).alias(f"eq{i}"),
                 count(a.isNull() & b.isNotNull()).alias(f"ln{i}"),
                 count(a.isNotNull() & b.isNull()).alias(f"rn{i}"), count(present).alias(f"both{i}"),
                 F.avg(F.when(present, diff)).alias(f"mean{i}"), F.max(F.when(present, diff)).alias(f"max{i}")]
    row = both.agg(*aggs).first().asDict()
    n = int(row["__n"])
    counts = {k: int(v or 0) for k, v in row.items() if not k.startswith(("mean", "max"))}
    out = []
    for i, c in enumerate(cols):
        shares = {k: None if n == 0 else counts[f"{k}{i}"] / n for k in ("nn", "eq", "ln", "rn")}
        out.append({
            "feature": c, "view": view_of(c), "kind": kinds[c], "realtime": view_of(c) in REALTIME_VIEWS,
            "rows": n, "equal_share": None if n == 0 else shares["nn"] + shares["eq"],
            "one_null_share": None if n == 0 else shares["ln"] + shares["rn"],
            "logged_only_null_share": shares["ln"], "recomputed_only_null_share": shares["rn"],
            "both_null_share": shares["nn"], "both_present": counts[f"both{i}"],
            "mean_abs_diff": _num(row[f"mean{i}"]), "max_abs_diff": _num(row[f"max{i}"]),
        })
    return out


def _num(value) -> float | None:
    return None if value is None else float(value)


def examples(joined, column: str, kind: str, limit: int = EXAMPLES) -> list[dict]:
    """A few impressions where ``column`` differs (by impression id, so a re-run picks the same)."""
    from pyspark.sql import functions as F

    a, b = F.col(f"`{L + column}`"), F.col(f"`{R + column}`")
    eq, _ = equal_and_diff(a, b, kind)
    differs = (a.isNull() != b.isNull()) | (a.isNotNull() & b.isNotNull() & ~eq)
    rows = (joined.where(differs).orderBy("impression_id").limit(limit)
            .select("impression_id", "model_version", a.alias("logged"), b.alias("recomputed")).collect())
    return [{"impression_id": r["impression_id"], "model_version": r["model_version"],
             "logged": _plain(r["logged"]), "recomputed": _plain(r["recomputed"])} for r in rows]


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def top_differing(stats: list[dict], k: int = TOP) -> list[str]:
    """Columns that differ on some row, most differing first (ties by name)."""
    differing = [s for s in stats if s["equal_share"] is not None and s["equal_share"] < 1.0]
    return [s["feature"] for s in sorted(differing, key=lambda s: (s["equal_share"], s["feature"]))[:k]]


def compare(spark, settings: Settings, start: date, end: date, negative_rate: float = 1.0, seed: int = 7) -> dict:
    """The summary (see the module docstring) of the days in [start, end]."""
    from pyspark.sql import functions as F

    cols = compared_columns()
    full = joined_rows(spark, settings, start, end, negative_rate, seed).cache()
    try:
        sides = full.agg(F.count("__logged").alias("replay"), F.count("__recomputed").alias("pit")).first()
        replay_n, pit_n = int(sides["replay"]), int(sides["pit"])
        both = full.where(F.col("__logged").isNotNull() & F.col("__recomputed").isNotNull())
        stats = column_stats(both, cols)
        compared = stats[0]["rows"]
        print(f"skew_report: {compared:,} impressions compared ({replay_n:,} replay rows, {pit_n:,} recomputed)",
              flush=True)
        top = top_differing(stats)
        batch = top_differing([s for s in stats if not s["realtime"]])
        realtime = top_differing([s for s in stats if s["realtime"]])
        kinds = {s["feature"]: s["kind"] for s in stats}
        shown = {c: examples(both, c, kinds[c]) for c in dict.fromkeys(top + batch)}
    finally:
        full.unpersist()
    by_view: dict[str, dict] = {}
    for s in stats:
        v = by_view.setdefault(s["view"], {"features": 0, "differing": 0, "realtime": s["realtime"]})
        v["features"] += 1
        v["differing"] += int(s["equal_share"] is not None and s["equal_share"] < 1.0)
    return {"start": start.isoformat(), "end": end.isoformat(), "negative_rate": negative_rate, "seed": seed,
            "relative_tolerance": REL_TOL, "replay_rows": replay_n, "recomputed_rows": pit_n,
            "rows_compared": compared, "log_coverage": None if pit_n == 0 else compared / pit_n,
            "top_differing": top, "top_differing_batch": batch, "top_differing_realtime": realtime,
            "by_view": by_view, "features": stats, "examples": shown,
            "batch_min_equal_share": min_equal_share([s for s in stats if not s["realtime"]]),
            "realtime_min_equal_share": min_equal_share([s for s in stats if s["realtime"]])}


def min_equal_share(stats: list[dict]) -> float | None:
    """The smallest share of rows equal over the columns (batch views and context, or real-time views)."""
    shares = [s["equal_share"] for s in stats if s["equal_share"] is not None]
    return min(shares) if shares else None


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "&ndash;"
    if pct:
        return f"{100 * value:.2f}%"
    return f"{value:.6g}" if isinstance(value, float) else html.escape(str(value))


def render(summary: dict) -> str:
    """The HTML page: the headline numbers, a row per column (differing ones first, a bar of the
    differing share), example impressions of the most differing columns."""
    order = sorted(summary["features"], key=lambda s: (s["equal_share"] if s["equal_share"] is not None else 1.0,
                                                       s["feature"]))
    rows = []
    for s in order:
        unequal = 0.0 if s["equal_share"] is None else 1.0 - s["equal_share"]
        mark = " (real-time)" if s["realtime"] else ""
        style = " style='background:#fff3f0'" if unequal > 0 else ""
        rows.append(
            f"<tr{style}><td>{html.escape(s['feature'])}</td><td>{html.escape(s['view'])}{mark}</td>"
            f"<td>{s['kind']}</td><td>{s['rows']:,}</td><td>{_fmt(s['equal_share'], True)}</td>"
            f"<td><div style='background:#d9534f;height:10px;width:{200 * unequal:.0f}px'></div></td>"
            f"<td>{_fmt(s['both_null_share'], True)}</td><td>{_fmt(s['logged_only_null_share'], True)}</td>"
            f"<td>{_fmt(s['recomputed_only_null_share'], True)}</td>"
            f"<td>{_fmt(s['mean_abs_diff'])}</td><td>{_fmt(s['max_abs_diff'])}</td></tr>")
    ex = []
    for col, items in summary["examples"].items():
        lines = "".join(f"<tr><td>{html.escape(e['impression_id'])}</td><td>{html.escape(str(e['model_version']))}"
                        f"</td><td>{html.escape(str(e['logged']))}</td><td>{html.escape(str(e['recomputed']))}</td></tr>"
                        for e in items)
        ex.append(f"<h3>{html.escape(col)}</h3><table><tr><th>impression</th><th>model</th><th>logged</th>"
                  f"<th>recomputed</th></tr>{lines}</table>")
    def names(key: str) -> str:
        return ", ".join(html.escape(c) for c in summary[key]) or "none"

    coverage = _fmt(summary["log_coverage"], True)
    return (
        "<html><head><meta charset='utf-8'><title>Training/serving skew</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left}</style></head><body>"
        f"<h1>Training/serving skew, {summary['start']} .. {summary['end']}</h1>"
        f"<p>{summary['rows_compared']:,} impressions compared: {summary['replay_rows']:,} replay rows (logged "
        f"features), {summary['recomputed_rows']:,} point-in-time rows (recomputed); {coverage} of the recomputed "
        f"impressions have a replayable log. Negatives kept at {summary['negative_rate']} (seed {summary['seed']}). "
        f"Floats equal within a relative tolerance of {summary['relative_tolerance']}; null == null is equal (the "
        "'null on both sides' column shows how much of a column's agreement is that).</p>"
        f"<p><b>Most differing (batch views and context):</b> {names('top_differing_batch')}<br>"
        f"<b>Most differing (real-time views):</b> {names('top_differing_realtime')}</p>"
        "<p>Real-time features are expected to differ: serving reads the online store at request time, the "
        "point-in-time join the real-time log strictly before the impression. A logged-only null means serving "
        "lacked a value the lake has; a recomputed-only null means serving had a value the lake cannot rebuild "
        "(for example a feature view the lake has no rows for).</p>"
        "<table><tr><th>column</th><th>view</th><th>kind</th><th>rows</th><th>equal</th><th>differing</th>"
        "<th>null on both sides</th><th>null only when logged</th><th>null only when recomputed</th>"
        f"<th>mean |&Delta;|</th><th>max |&Delta;|</th></tr>{''.join(rows)}</table>"
        f"<h2>Examples</h2>{''.join(ex) or '<p>none</p>'}</body></html>")


def report_dir(settings: Settings, start: date, end: date) -> Path:
    return settings.var_dir / "skew" / f"{start.isoformat()}_{end.isoformat()}"


def cache_age(spark, settings: Settings, start: date, end: date) -> dict:
    """The read path's cache as served, quantiles in ms over the logged impressions: ``staleness``, how long
    before the read the cache last found the shown ad's rows still the store's (``read_ms - ad_checked_ms``),
    beside the documented staleness; ``ad`` and ``advertiser``, how long before the read they were read from
    Redis (a row not written since is not re-read: the training set joins on this time)."""
    from pyspark.sql import functions as F

    from feature_repo.online import STALENESS_BOUND_S

    out: dict = {"documented_staleness_ms": int(STALENESS_BOUND_S * 1000)}
    logged = replay_set.logged_rows(spark, settings, start, end)
    if logged is None:
        return out
    for side, column in (("staleness", "ad_checked_ms"), ("ad", "ad_read_ms"), ("advertiser", "advertiser_read_ms")):
        age = (F.col("read_ms") - F.col(column)).cast("double")
        known = logged.where((F.col("read_ms") >= 0) & (F.col(column) >= 0))
        row = known.agg(F.count("*").alias("n"), F.percentile_approx(age, [0.5, 0.99], 10_000).alias("q"),
                        F.max(age).alias("max")).collect()[0]
        if row["n"]:
            out[side] = {"impressions": int(row["n"]), "p50_ms": float(row["q"][0]), "p99_ms": float(row["q"][1]),
                         "max_ms": float(row["max"])}
    return out


def run(start: date, end: date, settings: Settings | None = None, negative_rate: float = 1.0,
        seed: int = 7) -> dict:
    """Compare the days, write ``summary.json`` and ``report.html``; return the summary."""
    settings = settings or get_settings()
    spark = spark_session("skew_report", settings)
    summary = compare(spark, settings, start, end, negative_rate, seed)
    summary["ad_cache_age_ms"] = cache_age(spark, settings, start, end)
    out = report_dir(settings, start, end)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "report.html").write_text(render(summary))
    print(f"skew_report: most differing (batch, context): {', '.join(summary['top_differing_batch']) or 'none'}; "
          f"(real-time): {', '.join(summary['top_differing_realtime']) or 'none'}")
    print(f"skew_report: wrote {out / 'report.html'} and {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m batch_jobs.skew_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=date.fromisoformat, required=True, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--end", type=date.fromisoformat, required=True, help="last UTC day (included), YYYY-MM-DD")
    p.add_argument("--negative-rate", type=float, default=1.0,
                   help="compare only the negatives the training set keeps at this rate (default 1.0: all)")
    p.add_argument("--seed", type=int, default=7, help="seed of the downsampling hash (default 7)")
    a = p.parse_args(argv)
    if a.end < a.start:
        p.error("--end is before --start")
    run(a.start, a.end, negative_rate=a.negative_rate, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
