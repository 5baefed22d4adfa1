"""Training data for the batch cadences: training-set partitions (Delta) read day by day, and the held-out
split used for calibration and metrics."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd

from infra.settings import Settings
from trainers.data import Batch, InputSpec, concat, encode


def available_days(spark, settings: Settings) -> list[str]:
    """The ``ds`` partitions of the training set, oldest first."""
    from batch_jobs.training_set import training_path

    try:
        table = spark.read.format("delta").load(training_path(settings))
    except Exception as exc:  # noqa: BLE001 - Spark raises AnalysisException subclasses here
        raise FileNotFoundError(f"no training set at {training_path(settings)}: run "
                                f"`python -m batch_jobs.training_set` first ({exc.__class__.__name__})") from None
    return sorted(r["ds"] for r in table.select("ds").distinct().collect())


def day_range(end: date, days: int) -> list[str]:
    return [(end - timedelta(days=i)).isoformat() for i in range(days - 1, -1, -1)]


def read_days(spark, settings: Settings, days: list[str]) -> pd.DataFrame:
    """The training rows of ``days`` (one Spark read per day, so memory follows the encoded size)."""
    from pyspark.sql import functions as F

    from batch_jobs.training_set import training_path

    table = spark.read.format("delta").load(training_path(settings))
    frames = []
    for ds in days:
        frame = table.where(F.col("ds") == F.lit(ds)).toPandas()
        print(f"trainers: {ds}: {len(frame):,} training rows", flush=True)
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
