"""Registry bytes a day of online publishing: deltas behind the promotion gate vs full copies every 10 s.

``python -m bench.online_publish [--hours 24] [--rate 20000] [--publish-every 10]``

Replays ``--hours`` of the simulator's live rate (20,000 impressions an hour; 100k users and 20k ads with Zipf
popularity and 30-ad histories: ``bench.train_throughput.synthetic_frame``) through the online trainer's learner
(``trainers.online.OnlineLearner``: progressive validation against the promoted version, Adam, the default
schedule and clipping) with the production-size ranker (``settings.trainer``, 200k-bucket tables). Every
``--publish-every`` simulated seconds the trainer's rule runs: when the gate passes, the version is registered
as a delta (``Registry.register(base=...)``) over the line's previous version, every ``online_delta_chain``-th
over the batch root (``trainers.online.delta_base``), and promoted. Written bytes are measured from
the registry folder. The peer is the previous rule, a full copy every publication, whose bytes are the size of
one full version times the publications (writing them would take 450 GB). Also reported: what a scorer pays to
load the next delta version (its registry object holds the last version it loaded, as the scorer's does), and a
cold load (a fresh registry object: the root and up to ``online_delta_chain`` deltas).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.train_throughput import synthetic_frame
from infra.settings import get_settings
from trainers.data import InputSpec, encode
from trainers.model import Ranker
from trainers.online import OnlineLearner
from trainers.registry import Registry
from trainers.scoring import ScoringModel, load, save

GOAL_BYTES_PER_DAY = 1 << 30


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.online_publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--rate", type=float, default=20_000.0, help="impressions (training examples) an hour")
    p.add_argument("--publish-every", type=float, default=10.0, help="simulated seconds between publications")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = get_settings().trainer
    spec = InputSpec.from_schemas(cfg.id_buckets, cfg.small_buckets)
    root_dir = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    registry = Registry(root_dir)
    root = save(registry, ScoringModel(Ranker.from_settings(spec, cfg)), "full", {"data_range": []})
    registry.promote(root, reason="bench: the batch root")
    full_bytes = registry.meta(root)["size"]
    after_root = folder_bytes(root_dir)

    windows = int(a.hours * 3600 / a.publish_every)
    per_window = a.rate * a.publish_every / 3600
    rows = int(round(windows * per_window))
    print(f"bench: {rows:,} examples in {windows:,} publications of {a.publish_every:g} s "
          f"({a.hours:g} h at {a.rate:,.0f}/h)", flush=True)
    frame = synthetic_frame(rows, spec, seed=1)
    frame["label_ctr"] = frame["clicked"].astype(float)
    learner = OnlineLearner(load(registry, root).model, cfg, torch.device("cpu"), "naive")
    learner.set_incumbent(load(registry, root).model, root)
    registered, delta_sizes, began, start = [], [], time.monotonic(), 0
    for w in range(windows):
        end = int(round((w + 1) * per_window))
        if end > start:
            learner.learn(encode(frame.iloc[start:end], spec))
            start = end
        if learner.gate()["passed"]:
            before = folder_bytes(root_dir)
            parent = registered[-1] if registered else root
            chained = parent != root and registry.meta(parent)["delta_depth"] < cfg.online_delta_chain
            version = save(registry, ScoringModel(learner.model), "online", {"line_root": root},
                           base=parent if chained else root)
            registry.promote(version, reason="bench")
            delta_sizes.append(folder_bytes(root_dir) - before)
            registered.append(version)
            learner.set_incumbent(copy.deepcopy(learner.model), version)
        if (w + 1) % max(1, windows // 20) == 0:
            print(f"bench: {w + 1:,}/{windows:,} publications, {len(registered):,} registered, "
                  f"{time.monotonic() - began:,.0f} s", flush=True)

    reloads, colds = [], []
    scorer_view = Registry(root_dir)
    scorer_view.load(registered[-21] if len(registered) > 20 else root)
    for version in registered[-20:]:
        t0 = time.perf_counter()
        scorer_view.load(version)
        reloads.append((time.perf_counter() - t0) * 1000)
    for version in registered[-5:]:
        t0 = time.perf_counter()
        Registry(root_dir).load(version)
        colds.append((time.perf_counter() - t0) * 1000)

    day = 24.0 / a.hours
    ours = (folder_bytes(root_dir) - after_root) * day
    peer = full_bytes * windows * day
    print(f"\nOnline publishing, {a.hours:g} h at {a.rate:,.0f} examples/h, a publication every {a.publish_every:g} s "
          f"(scaled to a day){'' if a.hours == 24 else ' (extrapolated linearly: deltas grow over a day)'}:\n")
    print(f"{'rule':<44} {'versions/day':>13} {'bytes/version':>15} {'GB/day':>9} {'goal 1 GB':>10}")
    sizes = np.array(delta_sizes) if delta_sizes else np.zeros(1)
    print(f"{'ours: gated, deltas (chain of 30)':<44} {len(registered) * day:>13,.0f} "
          f"{sizes.mean():>15,.0f} {ours / 1e9:>9.2f} {'met' if ours <= GOAL_BYTES_PER_DAY else 'MISSED':>10}")
    print(f"{'peer: every publication, full copy':<44} {windows * day:>13,.0f} {full_bytes:>15,} "
          f"{peer / 1e9:>9.1f} {'met' if peer <= GOAL_BYTES_PER_DAY else 'MISSED':>10}")
    dense = sum(t.numel() * t.element_size() for t in learner.model.state_dict().values()
                if t.dim() < 2 or t.shape[0] < 4096)
    print(f"\ndelta size: first {sizes[0]:,.0f} B, last {sizes[-1]:,.0f} B, max {sizes.max():,.0f} B; the dense "
          f"parameters alone (written whole in every version) {dense:,} B")
    if reloads:
        print(f"loading the next version (the previous one held): p50 {np.percentile(reloads, 50):.1f} ms, "
              f"max {max(reloads):.1f} ms over {len(reloads)} versions; cold: max {max(colds):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
