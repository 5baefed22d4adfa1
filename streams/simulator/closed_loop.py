"""The closed loop: the simulator's ad server asks a policy (the scorer) which ads to show, so the models'
choices shape the data the next model learns from.

Per simulated hour: requests arrive (the same diurnal Poisson process, users and context as
``traffic.py``); the ad server draws each request's candidates from the live ads by popularity (or asks a
:class:`CandidateSource`, e.g. ``streams.serving.retrieval.Retriever``: the two-tower index), drops the
campaigns its budget pacing holds back, and asks the policy for the request's slots. The hidden truth
(``true_ctr_logit`` / ``true_cvr_logit``, the same world as the open-loop simulator) then decides clicks and
conversions of what was shown, at the position it was shown in. Conversions are billed at the auction's
second price (CPA) and count against the campaign's daily budget when they happen.

Events reach Kafka through the same delivery model as the open-loop run (jitter, duplicates, out-of-order,
late and malformed events), each delivered when its simulated delivery time has come: an hour's
conversions that happen days later wait in ``pending``. The scorer logs its own prediction-log records.

Budget pacing (per campaign, per UTC day): a campaign takes part in a request with probability ``rate``;
every ``pacing_step_s`` the rate moves toward spending the budget evenly over the day (down by 20 % when
spend is ahead of the day's elapsed share by 10 %, up by 25 % when behind), and a campaign whose budget is
spent leaves the auction until the next day.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
from scipy.special import expit, logit

from infra.settings import Settings
from streams.simulator.behaviour import Behaviour
from streams.simulator.config import SimulatorConfig
from streams.simulator.delivery import build_schedule, iter_messages
from streams.simulator.traffic import (
    MAX_SLOTS,
    _request_times,
    conversion_delays,
    negative_feedback,
    solve_offset,
    true_ctr_logit,
    true_cvr_logit,
    true_neg_logit,
)
from streams.simulator.world import DEVICE_P, DEVICES, PLACEMENT_P, PLACEMENTS, World, build_world

BASELINE_VERSION = "sim-serving-v1"
SLOT_P = np.array([0.4, 0.3, 0.2, 0.1])


@dataclass
class Request:
    """One ad request as the ad server sees it (the policy gets it as a ``streams.serving.scorer.AdRequest``)."""

    request_id: str
    user_id: int
    placement: str
    device: str
    event_time_ms: int
    slots: int
    ad_ids: np.ndarray
    campaign_ids: np.ndarray
    advertiser_ids: np.ndarray
    category_ids: np.ndarray
    bids: np.ndarray
    slot_ids: np.ndarray  # the world's ad slots of the candidates (truth only, never shown to the policy)


class CandidateSource(Protocol):
    """Where the ad server's candidates come from when not by popularity: told the live ads of each hour
    (:meth:`ClosedLoop.live_ads`), it names a request's candidates as rows of that frame (= the world's slots)."""

    def for_hour(self, ads: pd.DataFrame) -> None: ...

    def candidates(self, user_id: int, placement: str, device: str, event_time_ms: int) -> np.ndarray: ...


class EveryAd:
    """Every live ad is a candidate of every request (the peer of a funnel: the ranker sees everything)."""

    def for_hour(self, ads: pd.DataFrame) -> None:
        self.rows = np.arange(len(ads))

    def candidates(self, user_id: int, placement: str, device: str, event_time_ms: int) -> np.ndarray:
        return self.rows


@dataclass
class Pacer:
    """Daily budgets per campaign and each campaign's participation rate (see the module docstring)."""

    budgets: np.ndarray
    step_s: float = 900.0
    spend: np.ndarray = field(init=False)
    rate: np.ndarray = field(init=False)
    day: int = -1
    last_step_ms: int = -1

    def __post_init__(self) -> None:
        self.spend = np.zeros_like(self.budgets)
        self.rate = np.ones_like(self.budgets)

    def at(self, now_ms: int) -> None:
        """Advance to ``now_ms``: a new UTC day resets spend and rates; every ``step_s`` the rates adapt."""
        day = now_ms // 86_400_000
        if day != self.day:
            self.day, self.last_step_ms = day, now_ms
            self.spend[:] = 0.0
            self.rate[:] = 1.0
            return
        if now_ms - self.last_step_ms < self.step_s * 1000:
            return
        self.last_step_ms = now_ms
        elapsed = max((now_ms % 86_400_000) / 86_400_000, 1e-3)
        share = self.spend / np.maximum(self.budgets, 1e-9)
        ahead, behind = share > 1.1 * elapsed, share < 0.9 * elapsed
        self.rate = np.clip(np.where(ahead, self.rate * 0.8, np.where(behind, self.rate * 1.25, self.rate)), 0.02, 1)

    def charge(self, campaign: int, amount: float, when_ms: int) -> None:
        if when_ms // 86_400_000 == self.day:
            self.spend[campaign] += amount

    def eligible(self, campaigns: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        open_ = self.spend[campaigns] < self.budgets[campaigns]
        return open_ & (rng.random(len(campaigns)) < self.rate[campaigns])

    def summary(self) -> dict[str, float]:
        return {"campaigns_exhausted": int((self.spend >= self.budgets).sum()),
                "mean_rate": float(self.rate.mean()), "spend": float(self.spend.sum())}


def random_policy(req: Request) -> list[dict]:
    """Uniform serving: the first candidates as drawn (by ad popularity), no model. What a platform's small
    randomized bucket shows, and the demo's bootstrap day: data without any model's selection bias."""
    return [{"impression_id": f"{req.request_id}-{k}", "candidate": k, "position": k, "pctr": 0.0, "pcvr": 0.0,
             "ecpm": 0.0, "price": float(req.bids[k]), "explored": False, "model_version": BASELINE_VERSION, "arm": ""}
            for k in range(min(req.slots, len(req.ad_ids)))]


def baseline_policy(loop: ClosedLoop) -> Callable[[Request], list[dict]]:
    """The serving that ran before any model: the truth seen through noise, ranked by eCPM (first-price)."""

    def policy(req: Request) -> list[dict]:
        rng = np.random.default_rng(_seed(req.request_id))
        n = len(req.ad_ids)
        p = loop.truth_probabilities(np.full(n, req.user_id), req.slot_ids, req.placement, req.device,
                                     np.zeros(n, np.int64), np.full(n, req.event_time_ms))
        pctr = expit(np.log(p[0] / (1 - p[0])) + rng.normal(0, 0.3, n))
        pcvr = expit(np.log(p[1] / (1 - p[1])) + rng.normal(0, 0.3, n))
        ecpm = 1000 * req.bids * pctr * pcvr
        order = np.argsort(-ecpm, kind="stable")[: req.slots]
        return [{"impression_id": f"{req.request_id}-{k}", "candidate": int(i), "position": k,
                 "pctr": float(pctr[i]), "pcvr": float(pcvr[i]), "ecpm": float(ecpm[i]), "price": float(req.bids[i]),
                 "explored": False, "model_version": BASELINE_VERSION, "arm": ""} for k, i in enumerate(order)]

    return policy


def scorer_policy(scorer) -> Callable[[Request], list[dict]]:
    """A policy that asks ``streams.serving.scorer.Scorer`` (in process): it scores, runs the auction and logs."""
    from streams.serving.scorer import AdRequest

    def policy(req: Request) -> list[dict]:
        shown = scorer.score(AdRequest(
            request_id=req.request_id, user_id=req.user_id, placement=req.placement, device=req.device,
            event_time_ms=req.event_time_ms, slots=req.slots, ad_ids=req.ad_ids.tolist(),
            campaign_ids=req.campaign_ids.tolist(), advertiser_ids=req.advertiser_ids.tolist(),
            category_ids=req.category_ids.tolist(), bids=req.bids.tolist()))
        index = {a: i for i, a in enumerate(req.ad_ids.tolist())}
        return [{"impression_id": s.impression_id, "candidate": index[s.ad_id], "position": s.position,
                 "pctr": s.pctr, "pcvr": s.pcvr, "ecpm": s.ecpm, "price": s.price, "explored": s.explored,
                 "model_version": s.model_version, "arm": s.arm} for s in shown]

    return policy


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class ClosedLoop:
    """The ad server over a simulated period (``cfg.start`` for ``cfg.hours``), one hour at a time.

    ``candidates``: ads drawn per request by popularity, unless ``source`` chooses them (candidate retrieval);
    ``budget_scale``: the catalog's daily budgets times this (the
    budgets are in the simulated traffic's currency: scale them to the volume so that pacing binds)."""

    def __init__(self, cfg: SimulatorConfig, settings: Settings, candidates: int = 200,
                 budget_scale: float = 0.01, source: CandidateSource | None = None):
        self.cfg, self.settings, self.candidates, self.source = cfg, settings, candidates, source
        self.rng = np.random.default_rng([cfg.seed, 11])
        self.world: World = build_world(cfg, np.random.default_rng(cfg.seed))
        self.pacer = Pacer(self.world.campaign_daily_budget * budget_scale)
        self.ctr_offset, self.cvr_offset = self._offsets()
        self.behaviour = Behaviour(cfg, len(self.world.user_p))  # the sequential effects' state (cfg.effects)
        self.pending: list[tuple[int, str, bytes, bytes, list]] = []  # deliveries not due yet
        self.charges: list[tuple[int, int, float]] = []  # (conversion time, campaign, price) not billed yet
        self.hours_done = 0
        self.counts: dict[str, int] = {}

    # -- the hidden truth -------------------------------------------------------------------------------------
    def _offsets(self) -> tuple[float, float]:
        """Offsets that give the configured CTR and CVR under random serving (so a better policy shows more)."""
        cfg, w, n = self.cfg, self.world, 200_000
        rng = np.random.default_rng([cfg.seed, 12])
        user = rng.choice(len(w.user_p), n, p=w.user_p)
        slot = rng.choice(w.n_slots, n, p=w.slot_p)
        t = cfg.start_ms + rng.integers(0, int(cfg.hours * 3_600_000), n)
        gen = w.generation[self._hour_index(t), slot]
        place = rng.choice(len(PLACEMENTS), n, p=PLACEMENT_P)
        device = rng.choice(len(DEVICES), n, p=DEVICE_P)
        position = rng.choice(MAX_SLOTS, n, p=SLOT_P)
        ctr = true_ctr_logit(cfg, w, user, slot, gen, place, device, position, t)
        ctr_offset = solve_offset(ctr, cfg.ctr)
        self.neg_offset = solve_offset(true_neg_logit(w, user, slot, gen, ctr), cfg.neg_rate)
        clicked = rng.random(n) < expit(ctr + ctr_offset)
        cvr = true_cvr_logit(cfg, w, user[clicked], slot[clicked], gen[clicked], t[clicked])
        return ctr_offset, solve_offset(cvr, cfg.cvr)

    def _hour_index(self, t_ms: np.ndarray) -> np.ndarray:
        return np.clip((t_ms - self.cfg.start_ms) // 3_600_000, 0, self.world.generation.shape[0] - 1)

    def truth_probabilities(self, user, slot, placement: str | np.ndarray, device: str | np.ndarray,
                            position, t_ms, shown: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """True pCTR (at ``position``) and pCVR of showing the ads in ``slot`` to ``user`` at ``t_ms``, given what
        the users saw, clicked and converted before; ``shown``: the rows are shown in this order (a row's
        earlier rows count as views)."""
        place = np.searchsorted(PLACEMENTS, placement) if isinstance(placement, str) else placement
        dev = np.flatnonzero(DEVICES == device)[0] if isinstance(device, str) else device
        t_ms = np.asarray(t_ms, dtype=np.int64)
        gen = self.world.generation[self._hour_index(t_ms), slot]
        n = len(slot)
        place = np.broadcast_to(place, n)
        dev = np.broadcast_to(dev, n)
        ctr = true_ctr_logit(self.cfg, self.world, user, slot, gen, place, dev, position, t_ms)
        cvr = true_cvr_logit(self.cfg, self.world, user, slot, gen, t_ms)
        if self.cfg.effects.sequential:
            user = np.broadcast_to(user, n)
            ctr = ctr + self.behaviour.ctr_logit(user, self.world.ad_id(gen, slot), self.world.category_of(slot),
                                                 np.broadcast_to(t_ms, n), within=shown)
            cvr = cvr + self.behaviour.cvr_logit(user)
        return expit(ctr + self.ctr_offset), expit(cvr + self.cvr_offset)

    # -- one simulated hour ------------------------------------------------------------------------------------
    def live_ads(self, hour: int) -> pd.DataFrame:
        """The catalog of simulated hour ``hour``: the ad in each of the world's slots (row = slot), its ids and
        its campaign's bid (per conversion)."""
        w = self.world
        slots = np.arange(w.n_slots)
        gen = w.generation[min(hour, w.generation.shape[0] - 1), slots]
        campaigns = w.campaign_of(slots).astype(np.int64)
        return pd.DataFrame({"ad_id": w.ad_id(gen, slots).astype(np.int64),
                             "advertiser_id": w.advertiser_of(slots).astype(np.int64), "campaign_id": campaigns,
                             "category_id": w.category_of(slots).astype(np.int64),
                             "bid": np.round(w.campaign_bid[campaigns], 4)})

    def requests(self, hour: int) -> list[Request]:
        """The requests of simulated hour ``hour`` (deterministic for the seed and the hour). Each request's user
        and context come first from their own generator, so every candidate source sees the same requests."""
        cfg, w = self.cfg, self.world
        rng = np.random.default_rng([cfg.seed, 13, hour])
        draw = np.random.default_rng([cfg.seed, 17, hour])  # candidates and pacing
        start = cfg.start_ms + hour * 3_600_000
        hour_cfg = cfg.model_copy(update={"start": pd.Timestamp(start, unit="ms", tz="UTC").to_pydatetime(),
                                          "hours": 1.0})
        times = _request_times(hour_cfg, rng, float(np.arange(1, MAX_SLOTS + 1) @ SLOT_P))
        if self.source is not None:
            self.source.for_hour(self.live_ads(hour))
        out = []
        for i, t in enumerate(times.tolist()):
            user = int(rng.choice(len(w.user_p), p=w.user_p))
            placement = str(PLACEMENTS[rng.choice(len(PLACEMENTS), p=PLACEMENT_P)])
            device = str(DEVICES[rng.choice(len(DEVICES), p=DEVICE_P)])
            n_slots = int(rng.choice(np.arange(1, MAX_SLOTS + 1), p=SLOT_P))
            if self.source is None:
                slots = np.unique(draw.choice(w.n_slots, self.candidates, p=w.slot_p))
            else:
                slots = np.asarray(self.source.candidates(user, placement, device, int(t)), dtype=np.int64)
            campaigns = w.campaign_of(slots)
            self.pacer.at(t)
            keep = self.pacer.eligible(campaigns, draw)
            slots, campaigns = slots[keep], campaigns[keep]
            gen = w.generation[self._hour_index(np.array([t]))[0], slots]
            out.append(Request(
                request_id=f"{cfg.prefix}-h{hour}r{i}", user_id=user, placement=placement, device=device,
                event_time_ms=int(t), slots=n_slots, ad_ids=w.ad_id(gen, slots).astype(np.int64),
                campaign_ids=campaigns.astype(np.int64), advertiser_ids=w.advertiser_of(slots).astype(np.int64),
                category_ids=w.category_of(slots).astype(np.int64), bids=np.round(w.campaign_bid[campaigns], 4),
                slot_ids=slots))
        return out

    def serve_hour(self, hour: int, policy: Callable[[Request], list[dict]]) -> pd.DataFrame:
        """Ask ``policy`` for every request of ``hour``; the shown ads with their true outcomes (truth rows)."""
        rows = []
        for req in self.requests(hour):
            self._bill(req.event_time_ms)
            if len(req.ad_ids) == 0:
                continue
            for s in policy(req):
                i = s["candidate"]
                rows.append({"impression_id": s["impression_id"], "request_id": req.request_id,
                             "user_id": req.user_id, "ad_id": int(req.ad_ids[i]),
                             "advertiser_id": int(req.advertiser_ids[i]), "campaign_id": int(req.campaign_ids[i]),
                             "category_id": int(req.category_ids[i]), "placement": req.placement,
                             "position": int(s["position"]), "device": req.device, "bid": float(req.bids[i]),
                             "event_time_ms": req.event_time_ms, "served_pctr": s["pctr"], "served_pcvr": s["pcvr"],
                             "model_version": s["model_version"], "arm": s["arm"], "explored": s["explored"],
                             "ecpm": s["ecpm"], "price": s["price"], "slot": int(req.slot_ids[i])})
        self.hours_done = hour + 1
        return self._outcomes(hour, pd.DataFrame(rows))

    def _outcomes(self, hour: int, shown: pd.DataFrame) -> pd.DataFrame:
        if shown.empty:
            return shown
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 14, hour])
        n = len(shown)
        place = np.searchsorted(PLACEMENTS, shown["placement"].to_numpy())
        dev = np.array([np.flatnonzero(DEVICES == d)[0] for d in shown["device"]])
        self.behaviour.advance(self.cfg.start_ms + hour * 3_600_000)
        pctr, pcvr = self.truth_probabilities(shown["user_id"].to_numpy(), shown["slot"].to_numpy(), place, dev,
                                              shown["position"].to_numpy(), shown["event_time_ms"].to_numpy(),
                                              shown=True)
        clicked = rng.random(n) < pctr
        converts = clicked & (rng.random(n) < pcvr)
        windows = self.settings.windows
        click_delay = np.minimum(rng.lognormal(np.log(cfg.click_delay_median_s), cfg.click_delay_sigma, n),
                                 0.95 * windows.click_window_s)
        conv_delay = conversion_delays(cfg, rng, n)
        t = shown["event_time_ms"].to_numpy()
        click_ms = t + (click_delay * 1000).astype(np.int64)
        conv_ms = click_ms + (conv_delay * 1000).astype(np.int64)
        value = np.round(rng.lognormal(np.log(40), 0.8, n), 2)
        slots = shown["slot"].to_numpy()
        gen = self.world.generation[self._hour_index(t), slots]
        ctr_logit = logit(np.clip(pctr, 1e-12, 1 - 1e-12)) - self.ctr_offset
        neg_logit = true_neg_logit(self.world, shown["user_id"].to_numpy(), slots, gen, ctr_logit)
        feedback = negative_feedback(cfg, neg_logit, self.neg_offset, t, windows.feedback_window_s,
                                     np.random.default_rng([cfg.seed, 16, hour]))
        out = shown.drop(columns=["slot"]).assign(**feedback,
            true_pctr=pctr, true_pcvr=pcvr, clicked=clicked, click_time_ms=np.where(clicked, click_ms, -1),
            converts=converts, conversion_delay_s=np.where(converts, conv_delay, np.nan),
            conversion_time_ms=np.where(converts, conv_ms, -1),
            converted_in_window=converts & (conv_delay <= windows.conversion_window_s),
            conversion_value=np.where(converts, value, 0.0), feature_ref=shown["impression_id"])
        if self.cfg.effects.sequential:
            self.behaviour.observe(shown["user_id"].to_numpy(), self.world.ad_id(gen, slots),
                                   self.world.category_of(slots), t, clicked, click_ms, converts, conv_ms)
        billed = out[out["converted_in_window"]]
        self.charges += list(zip(billed["conversion_time_ms"].tolist(), billed["campaign_id"].tolist(),
                                 billed["price"].tolist(), strict=True))
        return out

    def _bill(self, now_ms: int) -> None:
        """Book the conversions that have happened by ``now_ms`` against their campaign's budget."""
        if not self.charges:
            return
        due = [c for c in self.charges if c[0] <= now_ms]
        if due:
            self.charges = [c for c in self.charges if c[0] > now_ms]
            for when, campaign, price in due:
                self.pacer.charge(campaign, price, when)

    # -- delivery ----------------------------------------------------------------------------------------------
    def deliveries(self, hour: int, truth: pd.DataFrame) -> None:
        """Add the hour's events to ``pending`` with their delivery times (every defect of the open loop)."""
        if truth.empty:
            return
        cfg = self.cfg.model_copy(update={"prediction_log": False})
        schedule = build_schedule(truth, cfg, self.settings, np.random.default_rng([self.cfg.seed, 15, hour]),
                                  drain=True)
        self.pending += [(when, topic, key, value, headers)
                         for topic, key, value, headers, when in iter_messages(schedule)]

    def due(self, until_ms: int) -> list[tuple[int, str, bytes, bytes, list]]:
        """The pending deliveries up to ``until_ms``, in delivery order (removed from ``pending``)."""
        self.pending.sort(key=lambda d: d[0])
        cut = next((i for i, d in enumerate(self.pending) if d[0] >= until_ms), len(self.pending))
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def send_due(producer, deliveries: Sequence[tuple[int, str, bytes, bytes, list]], speed: float, start_ms: int,
             wall0: float) -> dict[str, int]:
    """Send deliveries stamped with their simulated delivery time, paced at ``speed`` simulated s per wall s."""
    counts: dict[str, int] = {}
    for i, (when, topic, key, value, headers) in enumerate(deliveries):
        if speed > 0 and i % 16 == 0:
            ahead = (when - start_ms) / 1000.0 / speed - (time.monotonic() - wall0)
            if ahead > 0:
                time.sleep(ahead)
        producer.send(topic, value=value, key=key, headers=headers, timestamp_ms=when)
        counts[topic] = counts.get(topic, 0) + 1
    producer.flush()
    return counts


def run_hours(loop: ClosedLoop, hours: range, policy: Callable[[Request], list[dict]], producer, speed: float,
              on_hour: Callable[[int, pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Serve and deliver ``hours`` of the loop (paced); returns their truth rows. ``on_hour`` runs after each
    hour's events were sent (the demo checks the circuit breaker there)."""
    frames, wall0 = [], time.monotonic() - (hours.start * 3600.0 / speed if speed > 0 else 0.0)
    now_ms = int(time.time() * 1000)
    for hour in hours:
        t0 = time.monotonic()
        truth = loop.serve_hour(hour, policy)
        loop.deliveries(hour, truth)
        end_ms = min(loop.cfg.start_ms + (hour + 1) * 3_600_000, now_ms)
        sent = send_due(producer, loop.due(end_ms), speed, loop.cfg.start_ms, wall0)
        for topic, n in sent.items():
            loop.counts[topic] = loop.counts.get(topic, 0) + n
        frames.append(truth)
        clicks = int(truth["clicked"].sum()) if len(truth) else 0
        print(f"closed loop: hour {hour} ({pd.Timestamp(loop.cfg.start_ms + hour * 3_600_000, unit='ms'):%m-%d %H}h) "
              f"{len(truth):,} impressions, {clicks} clicks, {sum(sent.values()):,} events sent, "
              f"pacing {loop.pacer.summary()['campaigns_exhausted']} campaigns out of budget, "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        if on_hour is not None:
            on_hour(hour, truth)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
