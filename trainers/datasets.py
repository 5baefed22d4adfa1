"""Training data for the batch cadences: partitions (Delta) read day by day, and the held-out split used for
calibration and metrics.

Two sources, with the same columns: ``training`` (default), the point-in-time training sets
(``batch_jobs.training_set``: features recomputed from the lake), and ``replay``, the replay set
(``batch_jobs.replay_set``: features exactly as serving logged them, joined to matured labels)."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd

from infra.settings import Settings
from trainers.data import Batch, InputSpec, concat, encode

SOURCES = ("training", "replay")  # point-in-time training sets (default) | the replay set (features as served)


def source_table(settings: Settings, source: str = "training") -> tuple[str, str, str]:
    """(Delta path, quality table name, job that builds it) of a training-data source."""
    if source == "training":
        from batch_jobs.training_set import TABLE, training_path

        return training_path(settings), TABLE, "batch_jobs.training_set"
    if source == "replay":
        from batch_jobs.replay_set import TABLE, replay_path

        return replay_path(settings), TABLE, "batch_jobs.replay_set"
    raise ValueError(f"unknown training-data source {source!r}; one of {SOURCES}")


def available_days(spark, settings: Settings, source: str = "training") -> list[str]:
    """The ``ds`` partitions of the source's table, oldest first (days its quality gate quarantined are left
    out, and printed)."""
    from batch_jobs.quality import quarantined_days

    path, table_name, job = source_table(settings, source)
    try:
        table = spark.read.format("delta").load(path)
    except Exception as exc:  # noqa: BLE001 - Spark raises AnalysisException subclasses here
        raise FileNotFoundError(f"no {source} set at {path}: run "
                                f"`python -m {job}` first ({exc.__class__.__name__})") from None
    have = {r["ds"] for r in table.select("ds").distinct().collect()}
    if bad := sorted(have & quarantined_days(settings, table_name)):
        print(f"trainers: skipping quarantined {source} days {', '.join(bad)}", flush=True)
    return sorted(have - set(bad))


def day_range(end: date, days: int) -> list[str]:
    return [(end - timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


def read_days(spark, settings: Settings, days: list[str], source: str = "training") -> pd.DataFrame:
    """The rows of ``days`` from the source's table (one Spark read per day, so memory follows the encoded
    size). Both sources have the same columns; the replay set adds what serving did (model version, scores)."""
    from pyspark.sql import functions as F

    path, _, _ = source_table(settings, source)
    table = spark.read.format("delta").load(path)
    frames = []
    for ds in days:
        frame = table.where(F.col("ds") == F.lit(ds)).toPandas()
        print(f"trainers: {ds}: {len(frame):,} {source} rows", flush=True)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def holdout_mask(impression_ids: pd.Series, share: float, salt: str = "holdout") -> np.ndarray:
    """A deterministic ``share`` of impressions, the same on every run: SipHash of the id keyed by ``salt``, so
    masks with different salts are independent of each other."""
    key = salt.encode()[:16].ljust(16, b"_").decode()
    hashed = pd.util.hash_pandas_object(pd.Series(impression_ids).astype(str), index=False, hash_key=key)
    return (hashed.to_numpy() >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def encode_split(frame: pd.DataFrame, spec: InputSpec, share: float) -> tuple[Batch, Batch, pd.DataFrame]:
    """(training rows, held-out rows, held-out frame) of a frame."""
    mask = holdout_mask(frame["impression_id"], share)
    train, held = frame[~mask], frame[mask]
    chunks = [encode(train.iloc[i:i + 200_000], spec) for i in range(0, len(train), 200_000)]
    return concat(chunks) if chunks else encode(train, spec), encode(held, spec), held.reset_index(drop=True)
