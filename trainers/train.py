"""The training loop every cadence shares: mini-batches of a :class:`Batch`, Adam, progress, checkpoints.

``fit`` trains a model for some epochs over encoded rows and can resume from a checkpoint (the
model's and optimizers' state plus the step reached, written atomically every ``checkpoint_every``
steps); the order of rows is fixed by the seed, so a resumed run continues exactly where it stopped.
``predict`` scores rows in batches without the position bias, as serving does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainers.data import Batch, minibatches
from trainers.loss import multitask_loss
from trainers.model import autocast

log = logging.getLogger(__name__)


def optimizers(model: torch.nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters; SparseAdam for sparse embedding tables (only the rows a batch touches
    are updated, so a step costs the batch, not the table)."""
    sparse, dense = [], []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.sparse:
            sparse += list(module.parameters(recurse=False))
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    out: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=lr)]
    if sparse:
        out.append(torch.optim.SparseAdam(sparse, lr=lr))
    return out


@dataclass
class Progress:
    """What a run has done: steps, examples, the running loss (exponential average) and timing."""

    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    loss: dict[str, float] = field(default_factory=dict)

    def update(self, metrics: dict[str, float], n: int, alpha: float = 0.05) -> None:
        self.steps += 1
        self.examples += n
        for k, v in metrics.items():
            self.loss[k] = v if k not in self.loss else (1 - alpha) * self.loss[k] + alpha * v


def step(model: torch.nn.Module, opts: list[torch.optim.Optimizer], batch: Batch, scheme: str,
         device: torch.device, clip_norm: float | None = None) -> dict[str, float]:
    """One update on one mini-batch; with ``clip_norm``, the dense parameters' gradients (the first optimizer's:
    sparse embedding rows are scaled per row by SparseAdam already) are clipped to that L2 norm first."""
    model.train()
    batch = batch.to(device)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with autocast(device):
        out = model(batch)
    loss, metrics = multitask_loss(out, batch, scheme)
    loss.backward()
    if clip_norm is not None:
        dense = [p for group in opts[0].param_groups for p in group["params"] if p.grad is not None]
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(dense, clip_norm))
    for opt in opts:
        opt.step()
    return metrics


def _save_checkpoint(path: Path, model, opts, epoch: int, batch_index: int, progress: Progress) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizers": [o.state_dict() for o in opts], "epoch": epoch,
                "batch_index": batch_index, "steps": progress.steps, "examples": progress.examples}, tmp)
    os.replace(tmp, path)


def fit(model: torch.nn.Module, data: Batch, *, epochs: int, batch_size: int, lr: float, device: torch.device,
        scheme: str = "naive", seed: int = 0, checkpoint: Path | None = None, checkpoint_every: int = 200,
        desc: str = "train") -> Progress:
    """Train ``model`` in place on ``data``; resume from ``checkpoint`` if it exists (same data and seed)."""
    model.to(device)
    opts = optimizers(model, lr)
    progress = Progress()
    start_epoch, start_batch = 0, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        for opt, s in zip(opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        start_epoch, start_batch = state["epoch"], state["batch_index"]
        progress.steps, progress.examples = state["steps"], state["examples"]
        log.info("%s: resumed from %s at epoch %d batch %d", desc, checkpoint, start_epoch, start_batch)
    per_epoch = (len(data) + batch_size - 1) // batch_size
    began = time.monotonic()
    with tqdm(total=epochs * per_epoch, initial=start_epoch * per_epoch + start_batch, desc=desc,
              unit="batch", mininterval=2.0, disable=None) as bar:
        for epoch in range(start_epoch, epochs):
            for i, batch in enumerate(minibatches(data, batch_size, shuffle=True, seed=seed + epoch)):
                if epoch == start_epoch and i < start_batch:
                    continue
                progress.update(step(model, opts, batch, scheme, device), len(batch))
                bar.update(1)
                if progress.steps % 50 == 0:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in progress.loss.items()})
                if checkpoint is not None and progress.steps % checkpoint_every == 0:
                    _save_checkpoint(checkpoint, model, opts, epoch, i + 1, progress)
            start_batch = 0
    progress.seconds = time.monotonic() - began
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()  # finished: a later run starts fresh
    return progress


@torch.no_grad()
def predict(model: torch.nn.Module, data: Batch, device: torch.device, batch_size: int = 8192) -> dict[str, np.ndarray]:
    """pCTR, pCVR, pCTCVR and pNeg of every row, scored as serving does (default position)."""
    model.eval()
    model.to(device)
    parts: dict[str, list[np.ndarray]] = {"ctr": [], "cvr": [], "ctcvr": [], "neg": []}
    for batch in minibatches(data, batch_size, shuffle=False):
        with autocast(device):
            out = model(batch.to(device), position=False)
        parts["ctr"].append(out.p_ctr.float().cpu().numpy())
        parts["cvr"].append(out.p_cvr.float().cpu().numpy())
        parts["ctcvr"].append(out.p_ctcvr.float().cpu().numpy())
        parts["neg"].append(out.p_neg.float().cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
