"""The ranker's multi-task loss: CTR, CTCVR (ESMM) and negative feedback, over every impression.

- CTR: weighted BCE of ``ctr_logit`` against ``label_ctr``.
- CTCVR: BCE of ``p_ctcvr = p_ctr * p_cvr`` against ``label_ctcvr`` (soft labels allowed), over all
  impressions (ESMM).
- CVR on clicks: BCE of ``cvr_logit`` against the conversion label on clicked rows alone, times
  ``CVR_CLICK_WEIGHT``. Through pCTCVR alone a click's conversion signal is averaged with the ~20 non-clicks per
  click and the CVR tower barely learns (README, issue 20). This is the click-conditional CVR risk that ESCM2
  (Wang et al. 2022) adds to ESMM, here without its inverse-propensity weights: the held-out CVR is measured on
  clicks, and pCVR enters the eCPM only multiplied by pCTR. The model keeps this term from dragging the shared
  layers toward CVR (``cvr_shared_grad`` in ``trainers/model.py``).
- neg: BCE of ``neg_logit`` on rows that have a negative-feedback label (``label_neg`` not NaN), each row also
  weighted by ``neg_weight`` (1 / its sample rate: the training set keeps every click and some non-clicks).

Weights are used as they come, negative ones included: a row of weight -1 cancels an earlier example that
a correction superseded. Each term is divided by the sum of the *positive* weights of its rows (the examples
that stand), so the batch size does not change the step size and a superseded +/- pair does not dilute the
batch it is taken back in (a batch of cancellations alone is divided by the sum of ``|weight|``).

Schemes (the joiner's delay correction, ``label_joiner/schemes.py``):

- ``naive`` and ``delay_curve``: the loss above (delay_curve's correction is in its soft labels);
- ``fnw``, fake-negative weighting (Ktena et al. 2019) made exact under ESMM: every click arrives as a
  negative and every conversion as an extra positive. On clicked rows, with ``p`` the model's own pCVR (no
  gradient), the negative term is weighted by ``(1 - p)`` -- the share of a click's fake negatives that are
  true negatives -- and the positive term by 1; non-clicked rows keep weight 1.

  Ktena's weights are ``(1 + p)`` and ``(1 - p)(1 + p)``: the extra factor ``(1 + p)`` rescales the clicked
  rows' observed mass (``1 + p`` rows per click) back to one, which changes nothing in a loss over clicks
  alone. Here the loss is on pCTCVR over all impressions, so that factor weighs clicked rows ``1 + p`` times
  against non-clicked ones, and the fixed point moves up: with CTR ``c`` and CVR ``v`` the gradient vanishes
  where ``v (1 + p)(1 - c p) = p (1 - c p^2)`` (pCVR 0.1105 for a true 0.10 at CTR 5 %). With ``(1 - p, 1)`` it
  vanishes where ``(1 - c p) c v = c p (1 - c p)``, i.e. ``p = v`` for every ``c``; on a finite stream, at the
  stream's own conversions per click (``tests/test_delay_correction.py`` checks both).

>>> import torch
>>> from trainers.model import RankerOutput
>>> from trainers.data import Batch
>>> z = torch.zeros(2)
>>> batch = Batch(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.long),
...               torch.zeros(2, dtype=torch.long), torch.tensor([1.0, 0.0]), z, torch.full((2,), float("nan")),
...               torch.ones(2), torch.tensor([True, False]))
>>> loss, metrics = multitask_loss(RankerOutput(z, z, z), batch)
>>> round(metrics["ctr"], 4), metrics["neg"]
(0.6931, 0.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.data import Batch
from trainers.model import RankerOutput

SCHEMES = ("naive", "fnw", "delay_curve")
NEG_WEIGHT = 0.5
CVR_CLICK_WEIGHT = 1.0
P_CLAMP = 1e-7
EPS = 1e-12


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """``sum(weight * values) / sum(positive weights)``; over ``sum(|weight|)`` when no weight is positive (0 when
    every weight is 0).

    >>> w = torch.tensor([1.0, -1.0, 1.0])  # an example taken back (-1) and its correction (+1), and another
    >>> float(weighted_mean(torch.tensor([2.0, 2.0, 4.0]), w))  # (2 - 2 + 4) / 2: the pair is not counted twice
    2.0
    >>> float(weighted_mean(torch.tensor([2.0]), torch.tensor([-1.0])))
    -2.0
    """
    positive = weight.clamp_min(0.0).sum()
    norm = torch.where(positive > 0, positive, weight.abs().sum())
    return (weight * values).sum() / norm.clamp_min(EPS)


def fnw_weights(p_cvr: Tensor, clicked: Tensor) -> tuple[Tensor, Tensor]:
    """FNW factors of the positive and the negative term of each row's CTCVR loss: ``(1, 1 - p)`` on clicked
    rows, ``(1, 1)`` elsewhere (``p``: the model's pCVR, held constant)."""
    p = p_cvr.detach()
    positive = torch.ones_like(p)
    negative = torch.where(clicked, 1.0 - p, 1.0)
    return positive, negative


def multitask_loss(out: RankerOutput, batch: Batch, scheme: str = "naive") -> tuple[Tensor, dict[str, float]]:
    """The total loss to minimize and its float parts ``{"loss", "ctr", "ctcvr", "cvr", "neg"}``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown label scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    weight = batch.weight.float()

    # FNW's extra conversion rows carry ctr_weight 0: their click was already learned with the fake negative.
    ctr_weight = weight if batch.ctr_weight is None else weight * batch.ctr_weight.float()
    ctr = weighted_mean(
        F.binary_cross_entropy_with_logits(out.ctr_logit.float(), batch.label_ctr.float(), reduction="none"),
        ctr_weight,
    )

    # log pCTCVR = log sigmoid(ctr) + log sigmoid(cvr), in log space: a clamp on p would stop the gradient of
    # a row whose pCTCVR fell below it, and a collapsed tower would never come back.
    log_p = F.logsigmoid(out.ctr_logit.float()) + F.logsigmoid(out.cvr_logit.float())
    log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-P_CLAMP)))
    y = batch.label_ctcvr.float()
    pos_term, neg_term = -y * log_p, -(1.0 - y) * log_not_p
    if scheme == "fnw":
        pos_w, neg_w = fnw_weights(out.p_cvr.float(), batch.clicked)
        pos_term, neg_term = pos_w * pos_term, neg_w * neg_term
    ctcvr = weighted_mean(pos_term + neg_term, weight)

    # CVR on clicked rows (FNW's weights apply as they do to the CTCVR term: a fake negative counts 1 - p).
    cvr_pos = -y * F.logsigmoid(out.cvr_logit.float())
    cvr_neg = -(1.0 - y) * F.logsigmoid(-out.cvr_logit.float())
    if scheme == "fnw":
        cvr_pos, cvr_neg = pos_w * cvr_pos, neg_w * cvr_neg
    cvr = weighted_mean(torch.where(batch.clicked, cvr_pos + cvr_neg, 0.0),
                        torch.where(batch.clicked, weight, 0.0))

    labelled = ~torch.isnan(batch.label_neg)
    neg_bce = F.binary_cross_entropy_with_logits(
        out.neg_logit.float(), torch.nan_to_num(batch.label_neg.float(), nan=0.0), reduction="none"
    )
    neg_weight = weight if batch.neg_weight is None else weight * batch.neg_weight.float()
    neg = weighted_mean(torch.where(labelled, neg_bce, 0.0), torch.where(labelled, neg_weight, 0.0))

    total = ctr + ctcvr + CVR_CLICK_WEIGHT * cvr + NEG_WEIGHT * neg
    parts = torch.stack([total, ctr, ctcvr, cvr, neg]).detach().tolist()  # one device sync, not five
    return total, dict(zip(("loss", "ctr", "ctcvr", "cvr", "neg"), parts, strict=True))
