"""The ranker against LightGBM as the history grows (``python -m trainers.learning_curve``): is the gap at the CI
scale the model or the data?

One latent world (``make evaluate``'s, ids and context only) is simulated in process with as many history days
as the longest run asks for, then a held-out day. For each history length (the last N days before the held-out
day) the full retrain is trained as the batch cadences train it (``fit_ranker``: the settings' epochs with early
stopping, negatives kept at ``rate``, calibrated on the held-out share) from each training seed, and LightGBM on
the same rows (``fit_lightgbm``); both are scored on the held-out day against the truth. Prints one row per
history length and model (mean over training seeds), and the ranker minus LightGBM per task.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from infra.settings import Settings, get_settings
from streams.simulator.run import generate
from trainers.data import InputSpec, encode
from trainers.evaluate import (
    DAY_MS,
    THREADS,
    downsample,
    fit_lightgbm,
    fit_ranker,
    in_window_share,
    latent_config,
    oracle,
    task_metrics,
    truth_frame,
)

METRICS = (("ctr", "auc"), ("ctr", "nll"), ("cvr", "auc"), ("cvr", "nll"), ("ctcvr", "auc"), ("ctr", "ece"))


def world(settings: Settings, seed: int, days: int, users: int, ads: int, impressions_per_hour: int) -> pd.DataFrame:
    """``days`` history days and a held-out day of the latent world ``seed``, with the truth; ``day`` numbers them
    (the held-out day is ``days``)."""
    cfg = latent_config(seed, 24 * (days + 1), users, ads, impressions_per_hour, shock_hour=10**9)  # no shock
    truth = generate(cfg, settings).truth
    frame = truth_frame(truth, in_window_share(truth))
    frame["day"] = (frame["impression_time_ms"].to_numpy() - cfg.start_ms) // DAY_MS
    return frame


def _flat(metrics: dict) -> dict[str, float]:
    return {f"{task}_{metric}": metrics[task][metric] for task, metric in METRICS}


def curve(frame: pd.DataFrame, settings: Settings, history_days: list[int], training_seeds: list[int],
          rate: float = 0.25, seed: int = 11) -> pd.DataFrame:
    """One row per history length and model (ranker: mean over ``training_seeds``) on the held-out day."""
    spec = InputSpec.from_schemas(settings.trainer.id_buckets, settings.trainer.small_buckets)
    last = int(frame["day"].max())
    held = frame[frame["day"] == last]
    test = encode(held, spec)
    out = [{"days": 0, "model": "oracle", "rows": 0, **_flat(task_metrics(held, oracle(held)))}]
    for days in sorted(history_days):
        rows = downsample(frame[(frame["day"] < last) & (frame["day"] >= last - days)], rate)
        began = time.monotonic()
        peer = _flat(task_metrics(held, fit_lightgbm(rows, spec, settings, rate, seed).score(test)))
        out.append({"days": days, "model": "lightgbm", "rows": len(rows), **peer})
        ranker = []
        for training_seed in training_seeds:
            torch.manual_seed(training_seed)
            model = fit_ranker(rows, spec, settings, settings.trainer.epochs, rate)
            ranker.append(_flat(task_metrics(held, model.score(test))))
        out.append({"days": days, "model": "ranker", "rows": len(rows), **pd.DataFrame(ranker).mean().to_dict()})
        print(f"learning-curve: {days} history days, {len(rows):,} training rows: CTR AUC ranker "
              f"{out[-1]['ctr_auc']:.4f}, LightGBM {peer['ctr_auc']:.4f} ({time.monotonic() - began:.0f} s)",
              flush=True)
    return pd.DataFrame(out)


def gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per history length, the ranker minus LightGBM (AUC: higher is better; log loss: LightGBM minus the ranker,
    so positive is the ranker ahead on both)."""
    per = table[table["model"] != "oracle"].set_index(["days", "model"])
    diff = per.xs("ranker", level="model") - per.xs("lightgbm", level="model")
    nll = [c for c in diff.columns if c.endswith("_nll")]
    diff[nll] = -diff[nll]
    return diff[[c for c in diff.columns if c.endswith(("_auc", "_nll"))]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers.learning_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=11, help="the world (the CI evaluation's is 11)")
    p.add_argument("--days", type=int, nargs="+", default=[2, 4, 8], help="history lengths to train on")
    p.add_argument("--training-seeds", type=int, nargs="+", default=[11, 12])
    p.add_argument("--users", type=int, default=1_500)
    p.add_argument("--ads", type=int, default=300)
    p.add_argument("--impressions-per-hour", type=int, default=2_000, help="the CI scale's by default")
    a = p.parse_args(argv)
    settings = get_settings()
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        frame = world(settings, a.seed, max(a.days), a.users, a.ads, a.impressions_per_hour)
        table = curve(frame, settings, a.days, a.training_seeds, seed=a.seed)
    finally:
        torch.set_num_threads(previous)
    print(f"world {a.seed}, held-out day; ranker: mean over training seeds {a.training_seeds}\n"
          f"{table.to_string(index=False, float_format='%.4f')}")
    print(f"ranker minus LightGBM (log loss: LightGBM minus the ranker; > 0: the ranker ahead)\n"
          f"{gaps(table).to_string(float_format='%+.4f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
