"""Daily warm start: the promoted ranker, trained further on the latest day of training sets.

    python -m trainers.warm_start [--ds YYYY-MM-DD] [--epochs 1] [--no-promote]

Loads the batch head from the registry (the newest promoted full retrain or warm start that was never rolled
back: ``Registry.batch_head``; an online version is a branch off it, never the next day's parent), trains it
on one day (default: the newest partition) at a lower learning rate, re-calibrates on that day's held-out rows,
registers the result with the batch head as its parent and promotes it. Refuses a day the parent has already
seen (:func:`seen_days`: its ``data_range``, and the days of its ``learned_range`` when it learned online), so a
repeated run does not train twice on the same rows.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from trainers.cadence import train_and_register
from trainers.datasets import SOURCES, available_days, encode_split, read_days
from trainers.full_retrain import negative_rate_of
from trainers.model import pick_device
from trainers.registry import Registry
from trainers.retrieval import towers_of
from trainers.scoring import ScoringModel, load

WARM_LR_FACTOR = 0.3
DAY_MS = 86_400_000


def seen_days(meta: dict) -> list[str]:
    """The days a version was trained on: its batch ``data_range`` plus the UTC days its online line learned.

    >>> seen_days({"data_range": ["2026-11-01"], "learned_range": [1793577600000, 1793707200000]})
    ['2026-11-01', '2026-11-02', '2026-11-03']
    """
    days = set(meta.get("data_range") or [])
    learned = meta.get("learned_range")
    if learned:
        for day in range(learned[0] // DAY_MS, learned[1] // DAY_MS + 1):
            days.add(datetime.fromtimestamp(day * 86_400, UTC).date().isoformat())
    return sorted(days)


def parent_of_warm_start(registry: Registry, version: str | None = None) -> ScoringModel:
    """``version``, or the batch head (what the daily warm start continues from)."""
    version = version or registry.batch_head()
    if version is None:
        raise SystemExit("warm_start: no promoted batch model (full retrain or warm start) to continue from")
    return load(registry, version)


def run(settings: Settings, ds: str | None = None, epochs: int = 1, promote: bool = True,
        force: bool = False, source: str = "training", parent_version: str | None = None) -> str:
    """Train the promoted model on one day of ``source`` (``training``: the point-in-time training set;
    ``replay``: the prediction log joined to matured labels, features exactly as served)."""
    cfg = settings.trainer
    registry = Registry(settings.registry_dir)
    parent = parent_of_warm_start(registry, parent_version)
    spark = spark_session("warm_start", settings)
    have = available_days(spark, settings, source)
    day = ds or (have[-1] if have else None)
    if day not in have:
        raise SystemExit(f"warm_start: no {source} partition {day}")
    seen = parent.meta.get("data_range", [])
    if day in seen_days(parent.meta) and not force:
        raise SystemExit(f"warm_start: the parent {parent.version} was already trained on {day} "
                         f"(pass --force to train on it again)")
    print(f"warm_start: from {parent.version} over {day} ({source})", flush=True)
    frame = read_days(spark, settings, [day], source)
    model = parent.model
    if model.spec.fingerprint() != parent.meta["feature_service"]["spec"]:
        raise SystemExit("warm_start: the promoted model's input spec differs from its metadata")
    train, _, held = encode_split(frame, model.spec, cfg.calibration_share)
    ckpt = settings.var_dir / "trainers" / f"warm-{parent.version}-{day}.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    version, _ = train_and_register(model, train, held, settings=settings, cadence="warm",
                                    data_range=[*seen, day], parent=parent.version,
                                    negative_rate=negative_rate_of(frame), epochs=epochs,
                                    lr=cfg.learning_rate * WARM_LR_FACTOR, device=pick_device(cfg.device),
                                    promote=promote, checkpoint=ckpt, source=source,
                                    towers=towers_of(registry, parent.version))
    return version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.warm_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", help="the day to train on (YYYY-MM-DD); default the newest training-set partition")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--no-promote", action="store_true")
    p.add_argument("--force", action="store_true", help="train on a day the parent has already seen")
    p.add_argument("--parent", help="the version to continue from (default: the batch head)")
    p.add_argument("--source", choices=SOURCES, default="training",
                   help="training: point-in-time training set; replay: the prediction log joined to labels")
    args = p.parse_args(argv)
    run(get_settings(), args.ds, args.epochs, promote=not args.no_promote, force=args.force, source=args.source,
        parent_version=args.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
