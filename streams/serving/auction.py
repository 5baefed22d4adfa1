"""The auction: eCPM ranking, generalized second price, frequency caps and Thompson exploration for new ads.

Pure numpy over one request's candidates (row ``i`` = candidate ``i``):

- ``ecpm = 1000 x bid x pCTR x pCVR x (1 - pNeg) ** quality_exponent`` (``bid`` is per conversion);
- a candidate is eligible when its eCPM is positive and at least the reserve, and its campaign still has
  frequency-cap room for the user (``cap_left``, counted per campaign within the request too);
- slots are filled in eCPM order, never twice with the same ad (two ads of one campaign may both win);
- generalized second price: slot k's winner pays per conversion the least bid that keeps its rank,
  ``price_k = max(ecpm_next, reserve) / (1000 x pCTR_k x pCVR_k x quality_k)``, never above its bid, where
  ``ecpm_next`` is the eCPM of the candidate that would have taken the next slot (the reserve alone when none);
- exploration: on a share of requests chosen by hashing the request id, the pCTR of each *new* ad (fewer
  impressions than ``new_ad_impressions``) is replaced by a Thompson sample from
  ``Beta(s x pCTR + clicks, s x (1 - pCTR) + impressions - clicks)`` (``s``: ``prior_strength``), with a
  generator seeded from the request id, so a replayed request gets the same auction. A winner that would not
  have been shown without the samples (a new ad the greedy auction would have left out) is ``explored``.

>>> r = run_auction(np.array([1.0, 2.0]), np.array([0.1, 0.1]), np.array([0.5, 0.5]), np.zeros(2),
...                 ad_ids=np.array([7, 8]), slots=1)
>>> r.winners.tolist(), round(float(r.price[0]), 6)
([1], 1.0)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

NO_CAP = np.iinfo(np.int64).max


def request_hash(request_id: str, purpose: str) -> int:
    """A stable 64-bit hash of ``request_id`` for one ``purpose`` (never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(f"{purpose}:{request_id}".encode(), digest_size=8).digest(), "little")


def explores(request_id: str, share: float) -> bool:
    """Whether this request is in the exploration share (deterministic in the request id)."""
    return share > 0 and request_hash(request_id, "explore") / 2.0**64 < share


def request_rng(request_id: str) -> np.random.Generator:
    """The exploration generator of one request: the same request id, the same samples."""
    return np.random.default_rng(request_hash(request_id, "thompson"))


def thompson_pctr(pctr: np.ndarray, impressions: np.ndarray, clicks: np.ndarray, prior_strength: float,
                  rng: np.random.Generator) -> np.ndarray:
    """One Beta posterior sample per ad: a prior worth ``prior_strength`` impressions centred on the model's
    pCTR, updated with the ad's own clicks and impressions."""
    p = np.clip(np.asarray(pctr, dtype=np.float64), 1e-6, 1 - 1e-6)
    n = np.maximum(np.asarray(impressions, dtype=np.float64), 0.0)
    c = np.clip(np.asarray(clicks, dtype=np.float64), 0.0, n)
    return rng.beta(prior_strength * p + c, prior_strength * (1 - p) + n - c)


def quality(pneg: np.ndarray, exponent: float) -> np.ndarray:
    """The quality term: the chance of no negative feedback, to a power."""
    return np.clip(1.0 - np.asarray(pneg, dtype=np.float64), 0.0, 1.0) ** exponent


def ecpm(bid: np.ndarray, pctr: np.ndarray, pcvr: np.ndarray, pneg: np.ndarray, exponent: float = 1.0) -> np.ndarray:
    """Expected revenue per thousand impressions."""
    return 1000.0 * np.asarray(bid, dtype=np.float64) * pctr * pcvr * quality(pneg, exponent)


@dataclass(frozen=True)
class AuctionResult:
    """Winners (candidate rows, in slot order) and, per winner, the eCPM it ranked by (with its pCTR sample when
    explored), the price per conversion, the pCTR the auction used, and whether exploration put it there."""

    winners: np.ndarray  # int64 [k]
    ecpm: np.ndarray  # float64 [k]
    price: np.ndarray  # float64 [k]
    pctr: np.ndarray  # float64 [k]: the pCTR ranked and priced with (a Thompson sample for explored new ads)
    explored: np.ndarray  # bool [k]
    exploring: bool  # the request was in the exploration share


def _fill(order: np.ndarray, ads: np.ndarray, campaigns: np.ndarray, cap_left: np.ndarray,
          slots: int) -> list[int]:
    """The first ``slots + 1`` candidates of ``order`` that may take a slot (the last one only prices)."""
    taken_ads: set[int] = set()
    used: dict[int, int] = {}
    out: list[int] = []
    for i in order.tolist():
        ad, campaign = int(ads[i]), int(campaigns[i])
        if ad in taken_ads or used.get(campaign, 0) >= cap_left[i]:
            continue
        out.append(i)
        if len(out) > slots:
            break
        taken_ads.add(ad)
        used[campaign] = used.get(campaign, 0) + 1
    return out


def _rank(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(eligible)
    return rows[np.argsort(-score[rows], kind="stable")]  # ties: the earlier candidate first


def run_auction(bids: np.ndarray, pctr: np.ndarray, pcvr: np.ndarray, pneg: np.ndarray, *,
                ad_ids: np.ndarray, slots: int, campaign_ids: np.ndarray | None = None,
                cap_left: np.ndarray | None = None, impressions: np.ndarray | None = None,
                clicks: np.ndarray | None = None, request_id: str = "", quality_exponent: float = 1.0,
                reserve_ecpm: float = 0.0, explore_share: float = 0.0, new_ad_impressions: int = 0,
                prior_strength: float = 50.0) -> AuctionResult:
    """Rank, cap, explore and price one request's candidates (see the module docstring).

    ``cap_left``: impressions each candidate's campaign may still get for this user today (``NO_CAP``: no cap);
    ``impressions``/``clicks``: each ad's counts so far (an ad below ``new_ad_impressions`` is new)."""
    n = len(bids)
    bids = np.asarray(bids, dtype=np.float64)
    pctr = np.asarray(pctr, dtype=np.float64)
    pcvr = np.asarray(pcvr, dtype=np.float64)
    qual = quality(pneg, quality_exponent)
    ads = np.asarray(ad_ids, dtype=np.int64)
    campaigns = np.arange(n, dtype=np.int64) if campaign_ids is None else np.asarray(campaign_ids, dtype=np.int64)
    caps = np.full(n, NO_CAP, dtype=np.int64) if cap_left is None else np.asarray(cap_left, dtype=np.int64)
    exploit = 1000.0 * bids * pctr * pcvr * qual

    exploring = explores(request_id, explore_share) and impressions is not None and n > 0
    used_pctr, new = pctr, np.zeros(n, dtype=bool)
    if exploring:
        imps = np.nan_to_num(np.asarray(impressions, dtype=np.float64))
        new = imps < new_ad_impressions
        if new.any():
            clk = np.zeros(n) if clicks is None else np.nan_to_num(np.asarray(clicks, dtype=np.float64))
            used_pctr = pctr.copy()
            used_pctr[new] = thompson_pctr(pctr[new], imps[new], clk[new], prior_strength, request_rng(request_id))
        else:
            exploring = False
    score = 1000.0 * bids * used_pctr * pcvr * qual if exploring else exploit

    def eligible(s: np.ndarray) -> np.ndarray:
        return (s > 0) & (s >= reserve_ecpm) & (caps > 0) & (bids > 0)

    picked = _fill(_rank(score, eligible(score)), ads, campaigns, caps, slots)
    winners = np.array(picked[:slots], dtype=np.int64)
    next_ecpm = np.array([score[i] for i in picked[1:]] + [0.0] * (len(winners) + 1 - len(picked)))[:len(winners)]
    floor = np.maximum(next_ecpm, reserve_ecpm)
    denom = 1000.0 * used_pctr[winners] * pcvr[winners] * qual[winners]
    with np.errstate(divide="ignore", invalid="ignore"):
        price = np.where(denom > 0, floor / denom, 0.0)
    price = np.minimum(price, bids[winners])
    if exploring:
        greedy = set(_fill(_rank(exploit, eligible(exploit)), ads, campaigns, caps, slots)[:slots])
        explored = np.array([bool(new[i]) and i not in greedy for i in winners.tolist()], dtype=bool)
    else:
        explored = np.zeros(len(winners), dtype=bool)
    return AuctionResult(winners, score[winners], price, used_pctr[winners], explored, bool(exploring))
