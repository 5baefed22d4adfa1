"""Per epoch, the batch ranker with and without the feature service's features on one features world
(``python -m trainers.epoch_curves``): how many epochs each ranker needs, and whether the validation rows that
early stopping uses pick the epoch the held-out day would.

The world (``trainers.evaluate_features``, CI scale) goes through the real pipeline once (about 13 min here);
its history and held-out rows are kept in ``var/evaluation/epoch_curves/world<seed>.pkl``, so that later runs
(another learning rate, more epochs) only train. Each ranker trains every epoch (no early stopping) on the
rows ``fit_ranker`` trains on; after each epoch the validation rows (the calibration half of the held-out share)
and the held-out day are scored as serving scores them: the mean AUC of pCTR and pCTCVR, the early-stopping
criterion (``trainers.train.validation_score``).

The rankers: with every feature-service column, on ids and context only, and one more per ``--without VIEW``
(every column but that feature view's: which views help and which hurt). ``--training-seeds`` trains each
ranker from several initial weights and reports their mean, so one run's luck does not decide the comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import torch

from infra.settings import Settings, get_settings
from schemas.features import GOLD_TABLES, REALTIME_TABLES
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
    history, held = ef.split_world(*ef.through_the_pipeline(settings, cfg, scale.warmup_days), cfg, scale)
    cache.parent.mkdir(parents=True, exist_ok=True)
    pd.to_pickle({"history": history, "held": held}, cache)
    return history, held


# ``--without`` names for several views at once: every gold (batch) view, every real-time view.
VIEW_GROUPS = {"gold": tuple(t.VIEW for t in GOLD_TABLES), "realtime": tuple(t.VIEW for t in REALTIME_TABLES)}


def without_view(views: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The rows less the columns (``<view>__<feature>``) of ``views``: feature views or ``VIEW_GROUPS`` names,
    comma-separated."""
    names = tuple(v for name in views.split(",") for v in VIEW_GROUPS.get(name, (name,)))
    return lambda frame: frame.drop(columns=[c for c in frame.columns if c.split("__", 1)[0] in names])


def rankers(without: tuple[str, ...] = ()) -> list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame]]]:
    """(label, what the ranker's rows keep) of every ranker compared."""
    return ([("with features", lambda f: f), ("ids and context only", ef.without_features)]
            + [(f"without {view}", without_view(view)) for view in without])


def curves(history: pd.DataFrame, held: pd.DataFrame, settings: Settings, epochs: int, rate: float = 0.25,
           seed: int = 11, training_seeds: tuple[int, ...] = (), without: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per ranker, training seed and epoch: the validation rows' and the held-out day's ranking after that
    epoch (training seeds: ``training_seeds``, else ``seed`` alone)."""
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    cfg = settings.trainer
    out = []
    for label, view in rankers(without):
        train, _, validation = training_split(downsample(view(history), rate), spec, settings)
        test = encode(view(held), spec)
        for training_seed in training_seeds or (seed,):
            torch.manual_seed(training_seed)
            model = Ranker.from_settings(spec, cfg)
            model.fit_normalizer(train.dense)

            def score(epoch: int, label: str = label, model: Ranker = model, validation: Batch = validation,
                      test: Batch = test, training_seed: int = training_seed) -> None:
                out.append({"ranker": label, "training_seed": training_seed, "epoch": epoch,
                            "validation": validation_score(model, validation, CPU),
                            "held_out": validation_score(model, test, CPU)})
                print(f"epoch-curves: {label}, training seed {training_seed}, epoch {epoch}: validation "
                      f"{out[-1]['validation']:.4f}, held-out day {out[-1]['held_out']:.4f}", flush=True)

            fit(model, train, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate, device=CPU,
                desc=f"epochs {label}", patience=0, on_epoch=score, wide_lr_scale=cfg.wide_learning_rate_scale,
                wide_lr_scale_later=cfg.wide_learning_rate_scale_later)
    return pd.DataFrame(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per ranker, means over training seeds: the held-out score at each one's best epoch, at the epoch its
    validation rows pick, and (columns 1..E) after each epoch."""
    runs = table.groupby(["ranker", "training_seed"])
    best = runs["held_out"].max().groupby("ranker").mean()
    picked = table.loc[runs["validation"].idxmax(), ["ranker", "held_out"]].groupby("ranker")["held_out"].mean()
    per_epoch = table.groupby(["ranker", "epoch"])["held_out"].mean().unstack()
    return pd.concat([best.rename("best epoch"), picked.rename("validation's pick"), per_epoch], axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.epoch_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=11, help="the world (the CI test's is 11)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--training-seeds", type=int, nargs="+", default=[],
                   help="initial weights to train each ranker from (default: the world's seed)")
    p.add_argument("--without", nargs="+", default=[], metavar="VIEW",
                   help="also a ranker without these feature views' columns: a view, 'gold', 'realtime' or a "
                        "comma-separated list (e.g. user_features gold ad_realtime,user_realtime)")
    p.add_argument("--cache", type=Path, help="default var/evaluation/epoch_curves/world<seed>.pkl")
    a = p.parse_args(argv)
    settings = get_settings()
    cache = a.cache or settings.var_dir / "evaluation" / "epoch_curves" / f"world{a.seed}.pkl"
    history, held = load_world(a.seed, cache)
    previous = torch.get_num_threads()
    torch.set_num_threads(ef.THREADS)
    try:
        table = curves(history, held, settings, a.epochs, seed=a.seed, training_seeds=tuple(a.training_seeds),
                       without=tuple(a.without))
    finally:
        torch.set_num_threads(previous)
    wide = table.groupby(["epoch", "ranker"])[["validation", "held_out"]].mean().unstack("ranker")
    print(f"learning rate {settings.trainer.learning_rate}; mean of pCTR and pCTCVR AUC, mean over training seeds "
          f"{sorted(set(table['training_seed']))}\n{wide.to_string(float_format='%.4f')}")
    print(f"held-out day, world {a.seed}\n{summary(table).to_string(float_format='%.4f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
