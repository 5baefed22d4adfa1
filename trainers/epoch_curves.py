"""Per epoch, the batch ranker with and without the feature service's features on one features world
(``python -m trainers.epoch_curves``): how many epochs each ranker needs, and whether the validation rows that
early stopping uses pick the epoch the held-out day would.

The world (``trainers.evaluate_features``, CI scale) goes through the real pipeline once (about 13 min here);
its history and held-out rows are kept in ``var/evaluation/epoch_curves/world<seed>.pkl``, so that later runs
(another learning rate, more epochs) only train. Each ranker trains every epoch (no early stopping) on the
rows ``fit_ranker`` trains on; after each epoch the validation rows (the calibration half of the held-out share)
and the held-out day are scored as serving scores them: the mean AUC of pCTR and pCTCVR, the early-stopping
criterion (``trainers.train.validation_score``).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import torch

from infra.settings import Settings, get_settings
from trainers import evaluate_features as ef
from trainers.data import Batch, InputSpec, encode
from trainers.evaluate import downsample, training_split
from trainers.model import Ranker
from trainers.train import fit, validation_score

CPU = torch.device("cpu")


def load_world(seed: int, cache: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(history rows, held-out rows) of the CI-scale features world ``seed``: from ``cache``, else through the
    pipeline (the stack must be up) and then kept in ``cache``."""
    if cache.exists():
        saved = pd.read_pickle(cache)
        return saved["history"], saved["held"]
    scale = ef.SCALES["ci"]
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight - timedelta(days=scale.warmup_days + scale.history_days + 1)
    settings = ef.run_settings(f"epochs{int(time.time())}s{seed}")
    cfg = ef.world_config(settings, scale, seed, start)
    history, held = ef.split_world(*ef.through_the_pipeline(settings, cfg), cfg, scale)
    cache.parent.mkdir(parents=True, exist_ok=True)
    pd.to_pickle({"history": history, "held": held}, cache)
    return history, held


def curves(history: pd.DataFrame, held: pd.DataFrame, settings: Settings, epochs: int, rate: float = 0.25,
           seed: int = 11) -> pd.DataFrame:
    """One row per ranker and epoch: the validation rows' and the held-out day's ranking after that epoch."""
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    cfg = settings.trainer
    out = []
    for label, view in (("with features", lambda f: f), ("ids and context only", ef.without_features)):
        train, _, validation = training_split(downsample(view(history), rate), spec, settings)
        test = encode(view(held), spec)
        torch.manual_seed(seed)
        model = Ranker.from_settings(spec, cfg)
        model.fit_normalizer(train.dense)

        def score(epoch: int, label: str = label, model: Ranker = model, validation: Batch = validation,
                  test: Batch = test) -> None:
            out.append({"ranker": label, "epoch": epoch, "validation": validation_score(model, validation, CPU),
                        "held_out": validation_score(model, test, CPU)})
            print(f"epoch-curves: {label}, epoch {epoch}: validation {out[-1]['validation']:.4f}, held-out day "
                  f"{out[-1]['held_out']:.4f}", flush=True)

        fit(model, train, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate, device=CPU,
            desc=f"epochs {label}", patience=0, on_epoch=score)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.epoch_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=11, help="the world (the CI test's is 11)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cache", type=Path, help="default var/evaluation/epoch_curves/world<seed>.pkl")
    a = p.parse_args(argv)
    settings = get_settings()
    cache = a.cache or settings.var_dir / "evaluation" / "epoch_curves" / f"world{a.seed}.pkl"
    history, held = load_world(a.seed, cache)
    previous = torch.get_num_threads()
    torch.set_num_threads(ef.THREADS)
    try:
        table = curves(history, held, settings, a.epochs, seed=a.seed)
    finally:
        torch.set_num_threads(previous)
    wide = table.pivot(index="epoch", columns="ranker", values=["validation", "held_out"])
    print(f"learning rate {settings.trainer.learning_rate}; mean of pCTR and pCTCVR AUC\n"
          f"{wide.to_string(float_format='%.4f')}")
    for ranker, rows in table.groupby("ranker"):
        best, picked = rows.loc[rows["held_out"].idxmax()], rows.loc[rows["validation"].idxmax()]
        print(f"{ranker}: best on the held-out day epoch {best['epoch']} ({best['held_out']:.4f}); the validation "
              f"rows pick epoch {picked['epoch']} ({picked['held_out']:.4f} on the held-out day)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
