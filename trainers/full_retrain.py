"""Weekly full retrain: a new ranker from scratch over the last N days of training sets.

    python -m trainers.full_retrain [--end YYYY-MM-DD] [--days 30] [--epochs 4] [--no-promote]

Reads the training-set partitions (``batch_jobs.training_set``) of the days up to ``--end`` (default: the
newest), holds out a share of impressions for calibration and metrics, trains (``--epochs`` at most: early
stopping on the calibration rows, ``trainers/train.py``), registers the model with its metadata and promotes it.
Resumable: an interrupted run continues from its last checkpoint (``var/trainers/full-<end>.ckpt``) when started
again with the same arguments.
"""

from __future__ import annotations

import argparse
from datetime import date

from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from trainers.cadence import train_and_register
from trainers.data import InputSpec
from trainers.datasets import SOURCES, available_days, day_range, encode_split, read_days
from trainers.model import Ranker, pick_device


def negative_rate_of(frame) -> float:
    """The negatives' keep rate the training set was built with (it travels with the rows)."""
    negatives = frame.loc[~frame["clicked"].astype(bool), "sample_rate"]
    rates = negatives.unique()
    if len(rates) > 1:
        raise ValueError(f"training rows mix negative sample rates {sorted(rates)}: rebuild the days alike")
    return float(rates[0]) if len(rates) else 1.0


def run(settings: Settings, end: str | None = None, days: int | None = None, epochs: int | None = None,
        promote: bool = True, source: str = "training") -> str:
    cfg = settings.trainer
    spark = spark_session("full_retrain", settings)
    have = available_days(spark, settings, source)
    if not have:
        raise SystemExit(f"full_retrain: the {source} set has no partitions yet")
    end_day = date.fromisoformat(end or have[-1])
    wanted = [d for d in day_range(end_day, days or cfg.full_retrain_days) if d in have]
    if not wanted:
        raise SystemExit(f"full_retrain: no training-set partitions in the {days} days up to {end_day}")
    print(f"full_retrain: days {wanted[0]} .. {wanted[-1]} ({len(wanted)} partitions)", flush=True)
    frame = read_days(spark, settings, wanted, source)
    spec = InputSpec.from_schemas(cfg.id_buckets, cfg.small_buckets)
    train, _, held = encode_split(frame, spec, cfg.calibration_share)
    model = Ranker.from_settings(spec, cfg)
    model.fit_normalizer(train.dense)
    device = pick_device(cfg.device)
    ckpt = settings.var_dir / "trainers" / f"full-{wanted[-1]}.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    version, _ = train_and_register(model, train, held, settings=settings, cadence="full", data_range=wanted,
                                    parent=None, negative_rate=negative_rate_of(frame),
                                    epochs=epochs or cfg.epochs, lr=cfg.learning_rate, device=device,
                                    promote=promote, checkpoint=ckpt, source=source)
    return version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.full_retrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--end", help="last training-set day (YYYY-MM-DD); default the newest")
    p.add_argument("--days", type=int, help="days of training sets (default settings.trainer.full_retrain_days)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--no-promote", action="store_true", help="register without promoting")
    p.add_argument("--source", choices=SOURCES, default="training",
                   help="training: point-in-time training sets; replay: the prediction log joined to labels")
    args = p.parse_args(argv)
    run(get_settings(), args.end, args.days, args.epochs, promote=not args.no_promote, source=args.source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
