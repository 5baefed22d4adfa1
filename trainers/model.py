"""The ranker: a multi-task (CTR, CVR, negative feedback) model over the encoded :class:`~trainers.data.Batch`.

:class:`Ranker` reads every input the way ``trainers/data.py`` encodes it:

- one hashed embedding table per id field (bucket 0 is padding and embeds to zeros); the user's recent
  ads are looked up in the ``ad_id`` table and pooled by DIN-style target attention to the candidate ad;
- the dense features are normalized by the model itself (``dense_mean`` / ``dense_std`` buffers, fitted
  once with :meth:`RankerBase.fit_normalizer`), a missing value becomes the mean and a 0/1 indicator;
- a DCN-v2 cross network and an MLP in parallel over the concatenated inputs, then an MMoE layer
  (shared experts, one softmax gate per task) and one small tower per task;
- a position bias added to the CTR logit only (fixed to ``DEFAULT_POSITION`` when scoring);
- ESMM: pCTCVR = pCTR * pCVR is trained over all impressions; pCVR also gets a loss of its own on clicked
  rows (``trainers/loss.py``), through a CVR expert of its own (``cvr_expert``: its layer sizes), while its
  gradient into the shared layers is scaled by ``cvr_shared_grad``: the conversion signal reaches the CVR tower
  without pulling the layers CTR depends on toward CVR (negative transfer).

:class:`PlainMLP` is the cheapest peer with the same inputs and outputs. The same code runs on CPU and
CUDA: :func:`pick_device` chooses the device and :func:`autocast` turns on bf16 only on CUDA.

>>> from trainers.data import InputSpec
>>> model = Ranker(InputSpec.from_schemas(id_buckets=101, small_buckets=11), embedding_dim=4)
>>> Ranker.from_config(model.config).config == model.config
True
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from trainers.data import DEFAULT_POSITION, MAX_POSITION, Batch, InputSpec

TASKS = ("ctr", "cvr", "neg")
STD_FLOOR = 1e-3
EMBEDDING_INIT_STD = 0.05


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; otherwise the named device (``cpu``, ``cuda``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available")
    return device


def autocast(device: torch.device | str) -> AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (float32 there), so one training loop serves both."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class RankerOutput:
    """The three task logits, each ``[B]`` float32, and the probabilities they imply."""

    ctr_logit: Tensor
    cvr_logit: Tensor
    neg_logit: Tensor

    @property
    def p_ctr(self) -> Tensor:
        return torch.sigmoid(self.ctr_logit)

    @property
    def p_cvr(self) -> Tensor:
        """Conversion given a click."""
        return torch.sigmoid(self.cvr_logit)

    @property
    def p_ctcvr(self) -> Tensor:
        """Click and conversion (ESMM): never above ``p_ctr``."""
        return self.p_ctr * self.p_cvr

    @property
    def p_neg(self) -> Tensor:
        return torch.sigmoid(self.neg_logit)


def mlp_layers(in_dim: int, sizes: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU for each size in ``sizes``."""
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(in_dim, size), nn.ReLU()]
        in_dim = size
    return nn.Sequential(*layers)


def spec_from_dict(data: dict[str, Any]) -> InputSpec:
    """An :class:`InputSpec` back from ``dataclasses.asdict`` output (lists from JSON become tuples)."""
    return InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class RankerBase(nn.Module):
    """What every ranker shares: id embeddings, the dense normalizer and the CTR position bias."""

    def __init__(self, spec: InputSpec, embedding_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.embedding_dim = embedding_dim
        self.embeddings = nn.ModuleDict({
            # Sparse gradients: an optimizer step touches the rows of the batch, not the whole table.
            field: nn.Embedding(buckets, embedding_dim, padding_idx=0, sparse=True)
            for field, buckets in zip(spec.sparse_fields, spec.buckets, strict=True)
        })
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
        n_dense = len(spec.dense_columns)
        self.register_buffer("dense_mean", torch.zeros(n_dense))
        self.register_buffer("dense_std", torch.ones(n_dense))
        self.position_bias = nn.Embedding(MAX_POSITION + 1, 1)
        nn.init.zeros_(self.position_bias.weight)
        self.config: dict[str, Any] = {}

    @property
    def dense_dim(self) -> int:
        """Width of the dense part of the input: normalized values plus missing indicators."""
        return 2 * len(self.spec.dense_columns)

    @torch.no_grad()
    def fit_normalizer(self, dense: Tensor) -> None:
        """Set ``dense_mean`` / ``dense_std`` from ``[N, n_dense]`` training values, ignoring NaN.

        The std is floored at ``STD_FLOOR``; a column with no value at all keeps mean 0 and std 1."""
        dense = dense.to(self.dense_mean.device, torch.float64)
        present = ~torch.isnan(dense)
        count = present.sum(0)
        filled = torch.where(present, dense, 0.0)
        mean = filled.sum(0) / count.clamp_min(1)
        var = (torch.where(present, dense - mean, 0.0) ** 2).sum(0) / count.clamp_min(1)
        std = torch.where(count > 0, var.sqrt().clamp_min(STD_FLOOR), 1.0)  # never seen: leave it unscaled
        self.dense_mean.copy_(mean.float())
        self.dense_std.copy_(std.float())

    def field_embeddings(self, batch: Batch) -> Tensor:
        """``[B, n_fields, dim]``: one embedding per id field."""
        return torch.stack([table(batch.sparse[:, i]) for i, table in enumerate(self.embeddings.values())], 1)

    def dense_inputs(self, batch: Batch) -> Tensor:
        """``[B, 2 * n_dense]``: normalized values (missing = the mean, so 0) and missing indicators."""
        missing = torch.isnan(batch.dense)
        normalized = (batch.dense - self.dense_mean) / self.dense_std
        return torch.cat([torch.where(missing, 0.0, normalized), missing.float()], 1)

    def wide_logits(self, batch: Batch) -> Tensor:
        """``[B, k]``: each row's wide-part bias on each of the k tasks it adds to (none here)."""
        return batch.dense.new_zeros(len(batch), 0)

    def position_logit(self, batch: Batch, position: bool) -> Tensor:
        """``[B]`` CTR bias of each row's slot, or of ``DEFAULT_POSITION`` for every row when scoring."""
        if position:
            slots = batch.position.clamp(0, MAX_POSITION)
        else:
            slots = torch.full_like(batch.position, DEFAULT_POSITION)
        return self.position_bias(slots).squeeze(-1)

    @torch.no_grad()
    def shift_ctr_logit(self, delta: float) -> None:
        """Add ``delta`` to the CTR logit at every position (e.g. ``log(w)`` to move a model trained on
        negatives kept at rate w to the scale of the undownsampled stream: exactly the downsampling undone)."""
        self.position_bias.weight.add_(delta)

    def output(self, ctr: Tensor, cvr: Tensor, neg: Tensor, batch: Batch, position: bool) -> RankerOutput:
        """Float32 ``[B]`` logits, the position bias added to CTR."""
        ctr = ctr.squeeze(-1).float() + self.position_logit(batch, position).float()
        return RankerOutput(ctr, cvr.squeeze(-1).float(), neg.squeeze(-1).float())


class TargetAttention(nn.Module):
    """DIN-style attention of the candidate ad over the user's recent ads.

    An MLP scores each history item ``h`` against the candidate ``c`` from ``[h, c, h - c, h * c]``; the
    scores go through a softmax masked to real (non-padding) items, and the weighted sum of the history
    embeddings is the user's interest in this candidate. Masked softmax rather than DIN's unnormalized
    weights keeps the pooled vector on the scale of one embedding whatever the history length. A row
    with no history gets zeros.
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, history: Tensor, candidate: Tensor, mask: Tensor) -> Tensor:
        """``history`` ``[B, L, D]``, ``candidate`` ``[B, D]``, ``mask`` ``[B, L]`` (True = real) -> ``[B, D]``."""
        c = candidate.unsqueeze(1).expand_as(history)
        scores = self.score(torch.cat([history, c, history - c, history * c], -1)).squeeze(-1)
        has_history = mask.any(1, keepdim=True)
        # Empty rows attend uniformly over padding (finite, no NaN), then are zeroed.
        keep = mask | ~has_history
        weights = torch.softmax(scores.float().masked_fill(~keep, float("-inf")), 1)
        weights = weights * has_history
        return torch.einsum("bl,bld->bd", weights.to(history.dtype), history)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, its gradient scaled by ``scale`` (0: the layers below learn nothing from this path)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


class CrossNetwork(nn.Module):
    """DCN-v2 full-rank cross layers: ``x_{l+1} = x0 * (W x_l + b) + x_l``."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared one-layer experts, one softmax gate per task."""

    def __init__(self, in_dim: int, experts: int, expert_dim: int, tasks: int) -> None:
        super().__init__()
        self.experts, self.expert_dim = experts, expert_dim
        self.expert_layer = nn.Linear(in_dim, experts * expert_dim)  # every expert in one matmul
        self.gates = nn.ModuleList(nn.Linear(in_dim, experts) for _ in range(tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        """``[B, in_dim]`` -> one ``[B, expert_dim]`` mixture per task."""
        outputs = torch.relu(self.expert_layer(x)).view(-1, self.experts, self.expert_dim)
        return [torch.einsum("be,bed->bd", torch.softmax(gate(x), -1), outputs) for gate in self.gates]


class Ranker(RankerBase):
    """Embeddings + target attention + dense -> DCN-v2 cross || MLP -> MMoE -> ctr / cvr / neg towers.

    With ``interactions`` the pairwise dot products of the field embeddings (and the attention's interest
    vector) join the input, as in DLRM: a user x ad affinity is one number the towers read directly, instead of
    a product the MLP has to approximate.

    The CVR tower reads its MMoE mixture (gradient into the shared layers scaled by ``cvr_shared_grad``) and, with
    ``cvr_expert``, an expert of its own over the same inputs (PLE's task-specific expert).

    With ``wide`` (id fields) and ``wide_tasks``, each id of those fields also adds a bias of its own to those
    tasks' logits (the wide part of Wide & Deep, one number per id and task, starting at 0): an advertiser's or a
    user's own conversion rate is one number learned directly, not a direction the towers have to find in an
    embedding. Its tables are an optimizer group of their own (``trainers.train.optimizers``), so that they can train
    faster than the towers."""

    # What a saved config without these keys was trained as (before the CVR expert, before the wide part).
    LEGACY = {"cvr_expert": (), "cvr_shared_grad": 1.0, "wide": (), "wide_tasks": ()}

    def __init__(self, spec: InputSpec, embedding_dim: int = 16, cross_layers: int = 2,
                 mlp: tuple[int, ...] = (128, 64), experts: int = 3, expert_dim: int = 64,
                 interactions: bool = True, cvr_expert: tuple[int, ...] = (64,), cvr_shared_grad: float = 0.1,
                 wide: tuple[str, ...] = (), wide_tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__(spec, embedding_dim)
        self.config = {"model": type(self).__name__, "spec": dataclasses.asdict(spec),
                       "embedding_dim": embedding_dim, "cross_layers": cross_layers, "mlp": list(mlp),
                       "experts": experts, "expert_dim": expert_dim, "interactions": interactions,
                       "cvr_expert": list(cvr_expert), "cvr_shared_grad": cvr_shared_grad, "wide": list(wide),
                       "wide_tasks": list(wide_tasks)}
        self.cvr_shared_grad = cvr_shared_grad
        self.interactions = interactions
        n_vectors = len(spec.sparse_fields) + 1
        self.pairs = torch.triu_indices(n_vectors, n_vectors, offset=1) if interactions else None
        self.ad_field = spec.sparse_fields.index("ad_id")
        self.attention = TargetAttention(embedding_dim)
        x0_dim = n_vectors * embedding_dim + self.dense_dim + (self.pairs.shape[1] if interactions else 0)
        self.cross = CrossNetwork(x0_dim, cross_layers)
        self.deep = mlp_layers(x0_dim, mlp)
        self.mmoe = MMoE(x0_dim + (mlp[-1] if mlp else x0_dim), experts, expert_dim, len(TASKS))
        self.cvr_expert = mlp_layers(x0_dim, cvr_expert) if cvr_expert else None
        cvr_expert_dim = cvr_expert[-1] if cvr_expert else 0
        tower = max(expert_dim // 2, 1)
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(expert_dim + (cvr_expert_dim if task == "cvr" else 0), tower), nn.ReLU(),
                          nn.Linear(tower, 1))
            for task in TASKS
        )
        self.wide_columns = tuple(spec.sparse_fields.index(field) for field in wide)  # of ``batch.sparse``
        self.wide = nn.ModuleDict({
            field: nn.Embedding(spec.buckets[i], len(wide_tasks), padding_idx=0, sparse=True)
            for field, i in zip(wide, self.wide_columns, strict=True)
        })
        for table in self.wide.values():
            nn.init.zeros_(table.weight)
        self.register_buffer("wide_task_index", torch.tensor([TASKS.index(t) for t in wide_tasks], dtype=torch.long),
                             persistent=False)

    @classmethod
    def from_settings(cls, spec: InputSpec, trainer_settings: Any) -> Ranker:
        """The ranker sized by ``infra.settings.TrainerSettings`` (its ``embedding_dim`` and wide part)."""
        return cls(spec, embedding_dim=trainer_settings.embedding_dim, wide=tuple(trainer_settings.wide_fields),
                   wide_tasks=tuple(trainer_settings.wide_tasks))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Ranker:
        """The model ``config`` describes (untrained: load its state_dict next)."""
        args = cls.LEGACY | {k: v for k, v in config.items() if k not in ("model", "spec")}
        for key in ("mlp", "cvr_expert", "wide", "wide_tasks"):
            args[key] = tuple(args[key])
        return cls(spec_from_dict(config["spec"]), **args)

    def forward(self, batch: Batch, position: bool = True) -> RankerOutput:
        """Logits of the three tasks; ``position=False`` scores every row at ``DEFAULT_POSITION``."""
        fields = self.field_embeddings(batch)
        history = self.embeddings["ad_id"](batch.history)
        interest = self.attention(history, fields[:, self.ad_field], batch.history > 0)
        parts = [fields.flatten(1), interest, self.dense_inputs(batch)]
        if self.interactions:
            vectors = torch.cat([fields, interest.unsqueeze(1)], 1)
            dots = torch.bmm(vectors, vectors.transpose(1, 2))
            parts.append(dots[:, self.pairs[0], self.pairs[1]])
        x0 = torch.cat(parts, 1)
        shared = torch.cat([self.cross(x0), self.deep(x0)], 1)
        ctr_in, cvr_in, neg_in = self.mmoe(shared)
        cvr_in = scale_grad(cvr_in, self.cvr_shared_grad)
        if self.cvr_expert is not None:
            cvr_in = torch.cat([cvr_in, self.cvr_expert(x0)], 1)
        logits = torch.cat([tower(x) for tower, x in zip(self.towers, (ctr_in, cvr_in, neg_in), strict=True)], 1)
        if self.wide_columns:
            logits = logits.index_add(1, self.wide_task_index, self.wide_logits(batch).to(logits.dtype))
        return self.output(*logits.split(1, 1), batch, position)

    def wide_logits(self, batch: Batch) -> Tensor:
        """``[B, len(wide_tasks)]``: the sum of each row's ids' wide biases, per task of the wide part."""
        if not self.wide_columns:
            return super().wide_logits(batch)
        return sum(table(batch.sparse[:, i]) for i, table in zip(self.wide_columns, self.wide.values(), strict=True))


class PlainMLP(RankerBase):
    """The cheapest peer: the same embeddings and normalized dense inputs -> an MLP -> linear heads.

    No attention (the history is not read), no cross network, no experts; the same outputs and loss.
    """

    def __init__(self, spec: InputSpec, embedding_dim: int = 16, mlp: tuple[int, ...] = (128, 64)) -> None:
        super().__init__(spec, embedding_dim)
        self.config = {"model": type(self).__name__, "spec": dataclasses.asdict(spec),
                       "embedding_dim": embedding_dim, "mlp": list(mlp)}
        in_dim = len(spec.sparse_fields) * embedding_dim + self.dense_dim
        self.body = mlp_layers(in_dim, mlp)
        hidden = mlp[-1] if mlp else in_dim
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in TASKS)

    @classmethod
    def from_settings(cls, spec: InputSpec, trainer_settings: Any) -> PlainMLP:
        return cls(spec, embedding_dim=trainer_settings.embedding_dim)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PlainMLP:
        return cls(spec_from_dict(config["spec"]), embedding_dim=config["embedding_dim"], mlp=tuple(config["mlp"]))

    def forward(self, batch: Batch, position: bool = True) -> RankerOutput:
        x = torch.cat([self.field_embeddings(batch).flatten(1), self.dense_inputs(batch)], 1)
        hidden = self.body(x)
        ctr, cvr, neg = (head(hidden) for head in self.heads)
        return self.output(ctr, cvr, neg, batch, position)


MODELS: dict[str, type[Ranker] | type[PlainMLP]] = {"Ranker": Ranker, "PlainMLP": PlainMLP}


def model_from_config(config: dict[str, Any]) -> RankerBase:
    """Rebuild whichever model ``config["model"]`` names (``Ranker`` when absent)."""
    return MODELS[config.get("model", "Ranker")].from_config(config)
