"""Training throughput of the ranker and of its cheapest peer on a synthetic frame of realistic cardinalities.

``python -m bench.train_throughput [--rows 200000] [--batch-size 1024] [--steps N] [--device auto]``

Builds impressions with 100k users, 20k ads, 2k advertisers, 16 categories (Zipf-like popularity), every
dense feature of the input spec (5 % missing) and histories of up to 30 ads; encodes them with
``trainers.data.encode`` (its rows/s reported on their own), then trains :class:`~trainers.model.Ranker`
and :class:`~trainers.model.PlainMLP` for the same number of steps (Adam for dense parameters, SparseAdam for
the embedding tables, as the trainers use) after a warm-up. Reported per model:
examples/s and the share of the wall time spent waiting for input (slicing each mini-batch out of the
encoded frame and moving it to the device). On CUDA the timings synchronize the device; bf16 autocast is on.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.settings import get_settings
from schemas.features import N_CATEGORIES
from trainers.data import AFFINITY, HISTORY_COLUMN, PROFILE_COLUMN, Batch, InputSpec, encode, minibatches
from trainers.loss import multitask_loss
from trainers.model import PlainMLP, Ranker, RankerBase, autocast, pick_device
from trainers.train import optimizers

USERS, ADS, ADVERTISERS, CAMPAIGNS = 100_000, 20_000, 2_000, 5_000
WARMUP_STEPS = 5
DEFAULT_STEPS = {"cpu": 40, "cuda": 300}


def zipf_ids(rng: np.random.Generator, n_ids: int, size: int, a: float = 1.1) -> np.ndarray:
    """``size`` draws of ``0 .. n_ids - 1``, id ``k`` with probability proportional to ``1 / (k + 1) ** a``."""
    weights = 1.0 / np.arange(1, n_ids + 1) ** a
    return rng.choice(n_ids, size=size, p=weights / weights.sum())


def synthetic_frame(rows: int, spec: InputSpec, seed: int = 0) -> pd.DataFrame:
    """Impressions with ids, context, every dense feature of ``spec``, histories, profiles and labels."""
    rng = np.random.default_rng(seed)
    ad = zipf_ids(rng, ADS, rows)
    frame = pd.DataFrame({
        "user_id": zipf_ids(rng, USERS, rows, a=0.8), "ad_id": ad,
        "advertiser_id": ad % ADVERTISERS, "campaign_id": ad % CAMPAIGNS, "category_id": ad % N_CATEGORIES,
        "placement": rng.choice(["feed", "stories", "search", "sidebar"], rows),
        "device": rng.choice(["ios", "android", "web"], rows, p=[0.45, 0.4, 0.15]),
        "position": np.minimum(rng.geometric(0.3, rows) - 1, 15),
    })
    for name, log_scaled in zip(spec.dense_columns, spec.log_scaled, strict=True):
        if name == AFFINITY:
            continue  # derived by encode from the profile column
        values = rng.lognormal(2.0, 1.5, rows).round() if log_scaled else rng.beta(1.0, 20.0, rows)
        frame[name] = np.where(rng.random(rows) < 0.05, np.nan, values)
    lengths = rng.integers(0, 31, rows)
    history_ads = zipf_ids(rng, ADS, int(lengths.sum()))
    frame[HISTORY_COLUMN] = np.split(history_ads, np.cumsum(lengths)[:-1])
    frame[PROFILE_COLUMN] = list(rng.dirichlet(np.ones(N_CATEGORIES), rows))
    ctr = 1.0 / (1.0 + np.exp(-(-3.5 + 0.5 * np.sin(ad) - 0.1 * frame["position"].to_numpy())))
    frame["clicked"] = rng.random(rows) < ctr
    frame["converted"] = frame["clicked"] & (rng.random(rows) < 0.1)
    frame["label_neg"] = np.where(rng.random(rows) < 0.2, (rng.random(rows) < 0.05).astype(float), np.nan)
    return frame


def batches(data: Batch, batch_size: int):
    """Mini-batches forever, a new shuffle each epoch."""
    epoch = 0
    while True:
        yield from minibatches(data, batch_size, seed=epoch)
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: RankerBase, data: Batch, batch_size: int, steps: int, device: torch.device) -> dict:
    """Examples/s and input-wait share over ``steps`` Adam steps after ``WARMUP_STEPS``."""
    model.to(device).fit_normalizer(data.dense)
    model.train()
    opts = optimizers(model, 1e-3)  # Adam for dense parameters, SparseAdam for the embedding tables
    source = batches(data, batch_size)
    input_s = examples = 0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            sync(device)
            start, input_s, examples = time.perf_counter(), 0.0, 0
        t0 = time.perf_counter()
        batch = next(source).to(device)
        sync(device)
        input_s += time.perf_counter() - t0
        with autocast(device):
            loss, _ = multitask_loss(model(batch), batch, scheme="fnw")  # metrics: one sync per step
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        examples += len(batch)
    sync(device)
    wall = time.perf_counter() - start
    return {"examples_s": examples / wall, "input_wait": input_s / wall,
            "params": sum(p.numel() for p in model.parameters())}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"measured steps per model (default {DEFAULT_STEPS['cpu']} on CPU, "
                             f"{DEFAULT_STEPS['cuda']} on CUDA), after {WARMUP_STEPS} warm-up steps")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    steps = args.steps or DEFAULT_STEPS[device.type]
    trainer = get_settings().trainer
    spec = InputSpec.from_schemas(trainer.id_buckets, trainer.small_buckets)
    print(f"torch {torch.__version__} | device {device} ({device_name(device)}) | "
          f"threads {torch.get_num_threads()} | Adam + SparseAdam | bf16 autocast {device.type == 'cuda'}", flush=True)

    t0 = time.perf_counter()
    frame = synthetic_frame(args.rows, spec)
    t1 = time.perf_counter()
    data = encode(frame, spec)
    t2 = time.perf_counter()
    print(f"synthetic frame: {args.rows:,} rows in {t1 - t0:.1f} s; encode: {args.rows / (t2 - t1):,.0f} rows/s "
          f"({t2 - t1:.1f} s); {steps} measured steps per model\n", flush=True)

    print("| model | device | batch | examples/s | input wait % | params |")
    print("|---|---|---|---|---|---|")
    for name, make in (("Ranker", Ranker.from_settings), ("PlainMLP", PlainMLP.from_settings)):
        torch.manual_seed(0)
        result = measure(make(spec, trainer), data, args.batch_size, steps, device)
        print(f"| {name} | {device.type} | {args.batch_size} | {result['examples_s']:,.0f} | "
              f"{100 * result['input_wait']:.1f} | {result['params']:,} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
