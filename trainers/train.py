"""The training loop every cadence shares: mini-batches of a :class:`Batch`, Adam, progress, checkpoints.

``fit`` trains a model for some epochs over encoded rows and can resume from a checkpoint (the
model's and optimizers' state plus the step reached, written atomically every ``checkpoint_every``
steps); the order of rows is fixed by the seed, so a resumed run continues exactly where it stopped.
With ``validation`` rows, ``epochs`` is a maximum: after each epoch the rows are scored as serving scores them and
training stops once their ranking (the mean AUC of pCTR and pCTCVR, what the auction's eCPM ranks by) has not
improved for ``patience`` epochs; the model keeps the weights of its best epoch. Deep CTR models over sparse ids
overfit within a few epochs (the "one-epoch phenomenon"). The criterion is a ranking, not the loss: the
validation log loss turns up an epoch or two before the ranking stops improving (the model grows overconfident,
which the post-hoc calibrators then undo), so stopping on the loss stopped too early (README, issue 20).
``predict`` scores rows in batches without the position bias, as serving does.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainers.data import Batch, minibatches
from trainers.loss import multitask_loss
from trainers.metrics import auc
from trainers.model import autocast

log = logging.getLogger(__name__)


WIDE_GROUP = "wide"  # the name of the optimizer group of a ranker's wide tables


def set_wide_scale(opts: list[torch.optim.Optimizer], lr: float, scale: float) -> None:
    """Set the wide tables' group (if any) to ``scale`` x ``lr``."""
    for opt in opts:
        for group in opt.param_groups:
            if group.get("name") == WIDE_GROUP:
                group["lr"], group["lr_scale"] = lr * scale, scale


def optimizers(model: torch.nn.Module, lr: float, wide_lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """Adam for the dense parameters; SparseAdam for sparse embedding tables (only the rows a batch touches
    are updated, so a step costs the batch, not the table). A ranker's wide tables are a group of their own at
    ``wide_lr_scale`` x ``lr``; every group keeps its ``lr_scale``, so a schedule sets ``lr x lr_scale``."""
    wide = getattr(model, "wide", None)
    wide_ids = {id(p) for p in wide.parameters()} if isinstance(wide, torch.nn.Module) else set()
    sparse = [p for module in model.modules() if isinstance(module, torch.nn.Embedding) and module.sparse
              for p in module.parameters(recurse=False) if id(p) not in wide_ids]
    sparse_ids = {id(p) for p in sparse} | wide_ids
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    out: list[torch.optim.Optimizer] = [torch.optim.Adam([{"params": dense, "lr_scale": 1.0}], lr=lr)]
    groups = [{"params": sparse, "lr_scale": 1.0}] if sparse else []
    if wide_ids:
        groups.append({"params": list(wide.parameters()), "lr": lr * wide_lr_scale, "lr_scale": wide_lr_scale,
                       "name": WIDE_GROUP})
    if groups:
        out.append(torch.optim.SparseAdam(groups, lr=lr))
    return out


@dataclass
class Progress:
    """What a run has done: steps, examples, the running loss (exponential average) and timing."""

    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    loss: dict[str, float] = field(default_factory=dict)
    validation: list[float] = field(default_factory=list)  # the validation score after each epoch (higher: better)
    best_epoch: int | None = None  # 1-based: the epoch whose weights the model kept

    def best(self) -> int:
        """0-based index of the best epoch so far (the first of equals)."""
        return self.validation.index(max(self.validation))

    def epochs_since_best(self) -> int:
        return len(self.validation) - 1 - self.best()

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


def validation_score(model: torch.nn.Module, data: Batch, device: torch.device) -> float:
    """The mean AUC of pCTR (against clicks) and pCTCVR (against conversions) on ``data``, scored as serving
    scores; pCTR's alone where the rows hold no conversion; NaN where they cannot rank clicks either."""
    p = predict(model, data, device)
    aucs = [auc(data.label_ctr.numpy() > 0.5, p["ctr"]), auc(data.label_ctcvr.numpy() > 0.5, p["ctcvr"])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(path: Path, model, opts, epoch: int, batch_index: int, progress: Progress,
                     best: dict | None) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizers": [o.state_dict() for o in opts], "epoch": epoch,
                "batch_index": batch_index, "steps": progress.steps, "examples": progress.examples,
                "validation": progress.validation, "best": best}, tmp)
    os.replace(tmp, path)


def fit(model: torch.nn.Module, data: Batch, *, epochs: int, batch_size: int, lr: float, device: torch.device,
        scheme: str = "naive", seed: int = 0, checkpoint: Path | None = None, checkpoint_every: int = 200,
        desc: str = "train", validation: Batch | None = None, patience: int = 1,
        on_epoch: Callable[[int], None] | None = None, wide_lr_scale: float = 1.0,
        wide_lr_scale_later: float | None = None) -> Progress:
    """Train ``model`` in place on ``data``; resume from ``checkpoint`` if it exists (same data and seed).

    With ``validation`` (and ``patience`` > 0), stop early and keep the best epoch's weights (module docstring);
    validation rows without both a click and a non-click cannot rank, and every epoch runs. ``on_epoch(n)`` is
    called after epoch n (1-based) with the model as that epoch left it (for measurements). A ranker's wide
    tables train at ``wide_lr_scale`` x ``lr`` in the first epoch and at ``wide_lr_scale_later`` x ``lr`` (default:
    the same) after it: a fast first pass takes each id to its level, and more passes at that rate memorize (each
    touch moves a bias by about the rate, whatever its gradient: SparseAdam). A resumed run takes its groups' rates
    from the checkpoint."""
    model.to(device)
    opts = optimizers(model, lr, wide_lr_scale)
    progress = Progress()
    start_epoch, start_batch = 0, 0
    # Early stopping needs a choice to make (more than one epoch) and rows it can rank: at least one click and one
    # non-click (else every epoch runs).
    early = (epochs > 1 and patience > 0 and validation is not None
             and 0 < int((validation.label_ctr > 0.5).sum()) < len(validation))
    best: dict[str, torch.Tensor] | None = None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        for opt, s in zip(opts, state["optimizers"], strict=True):
            names = [group.get("name") for group in opt.param_groups]
            opt.load_state_dict(s)  # takes the saved groups' keys: one saved before groups were named has no name
            for group, name in zip(opt.param_groups, names, strict=True):
                if name is not None:
                    group["name"] = name
        start_epoch, start_batch = state["epoch"], state["batch_index"]
        if start_epoch > 0 and wide_lr_scale_later is not None:  # past the first epoch, whatever rate was saved
            set_wide_scale(opts, lr, wide_lr_scale_later)
        progress.steps, progress.examples = state["steps"], state["examples"]
        progress.validation, best = list(state.get("validation", [])), state.get("best")
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
                    _save_checkpoint(checkpoint, model, opts, epoch, i + 1, progress, best)
            start_batch = 0
            if wide_lr_scale_later is not None:
                set_wide_scale(opts, lr, wide_lr_scale_later)
            if on_epoch is not None:
                on_epoch(epoch + 1)
            if early:
                progress.validation.append(validation_score(model, validation, device))
                if progress.best() == len(progress.validation) - 1:
                    best = _copy_state(model)
                log.info("%s: epoch %d validation AUC %.5f", desc, epoch + 1, progress.validation[-1])
                bar.set_postfix({"val": f"{progress.validation[-1]:.4f}"})
                if progress.epochs_since_best() >= patience:
                    break
    if early and best is not None:
        model.load_state_dict(best)
        progress.best_epoch = progress.best() + 1
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
