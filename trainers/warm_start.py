"""Daily warm start: the promoted ranker, trained further on the latest day of training sets.

    python -m trainers.warm_start [--ds YYYY-MM-DD] [--epochs 1] [--no-promote]

Loads the promoted model from the registry (weights, normalizer and config; never unpickled), trains it on
one day (default: the newest partition) at a lower learning rate, re-calibrates on that day's held-out rows,
registers the result with the promoted version as its parent and promotes it. Refuses a day the parent has
already seen (its ``data_range``), so a repeated run does not train twice on the same rows.
"""

from __future__ import annotations

import argparse

from infra.settings import Settings, get_settings
from infra.spark_session import spark_session
from trainers.cadence import train_and_register
from trainers.datasets import SOURCES, available_days, encode_split, read_days
from trainers.full_retrain import negative_rate_of
from trainers.model import pick_device
from trainers.registry import Registry
from trainers.scoring import load

WARM_LR_FACTOR = 0.3


def run(settings: Settings, ds: str | None = None, epochs: int = 1, promote: bool = True,
        force: bool = False, source: str = "training") -> str:
    """Train the promoted model on one day of ``source`` (``training``: the point-in-time training set;
    ``replay``: the prediction log joined to matured labels, features exactly as served)."""
    cfg = settings.trainer
    registry = Registry(settings.registry_dir)
    parent = load(registry)
    spark = spark_session("warm_start", settings)
    have = available_days(spark, settings, source)
    day = ds or (have[-1] if have else None)
    if day not in have:
        raise SystemExit(f"warm_start: no {source} partition {day}")
    seen = parent.meta.get("data_range", [])
    if day in seen and not force:
        raise SystemExit(f"warm_start: the promoted model {parent.version} was already trained on {day} "
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
                                    promote=promote, checkpoint=ckpt, source=source)
    return version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.warm_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", help="the day to train on (YYYY-MM-DD); default the newest training-set partition")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--no-promote", action="store_true")
    p.add_argument("--force", action="store_true", help="train on a day the parent has already seen")
    p.add_argument("--source", choices=SOURCES, default="training",
                   help="training: point-in-time training set; replay: the prediction log joined to labels")
    args = p.parse_args(argv)
    run(get_settings(), args.ds, args.epochs, promote=not args.no_promote, force=args.force, source=args.source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
