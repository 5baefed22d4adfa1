"""Users, ads, advertisers and campaigns with latent factors: the hidden truth behind every click.

Ads live in *slots*: a slot keeps its popularity, campaign and advertiser, and churn replaces the ad in
a slot by a new one (a new ``ad_id``, new factors: a cold start) at hourly steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from schemas.features import N_CATEGORIES
from streams.simulator.config import SimulatorConfig

PLACEMENTS = np.array(["feed", "search", "sidebar", "video"])
PLACEMENT_P = np.array([0.5, 0.25, 0.15, 0.10])
PLACEMENT_LOGIT = np.array([0.0, 0.6, -0.6, 0.2])
DEVICES = np.array(["mobile", "desktop", "tablet"])
DEVICE_P = np.array([0.65, 0.28, 0.07])
DEVICE_LOGIT = np.array([0.1, -0.1, 0.0])
POSITION_LOGIT_PER_SLOT = -0.35  # position bias: each slot further down loses this much logit
ADS_PER_CAMPAIGN = 5
CAMPAIGNS_PER_ADVERTISER = 4


def zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities proportional to 1 / rank**exponent, ranks shuffled over the ids."""
    w = 1.0 / np.arange(1, n + 1) ** exponent
    rng.shuffle(w)
    return w / w.sum()


@dataclass
class World:
    user_p: np.ndarray            # (U,) activity
    user_ctr_f: np.ndarray        # (U, d) factors for clicks
    user_cvr_f: np.ndarray        # (U, d) factors for conversions
    slot_p: np.ndarray            # (S,) ad popularity
    generation: np.ndarray        # (H, S) ad generation of each slot in each simulated hour
    ad_ctr_f: np.ndarray          # (G, S, d)
    ad_cvr_f: np.ndarray          # (G, S, d)
    ad_ctr_bias: np.ndarray       # (G, S)
    ad_cvr_bias: np.ndarray       # (G, S)
    campaign_bid: np.ndarray      # (C,)
    # The catalog (drawn from its own generator, so adding it changed no other draw).
    advertiser_category: np.ndarray  # (A,) the advertiser's vertical
    user_category_affinity: np.ndarray  # (U, N_CATEGORIES) click logit a user adds for each category
    campaign_daily_budget: np.ndarray  # (C,)
    campaign_age_days: np.ndarray  # (C,) days the campaign has run at the simulated start
    # Effects (their own generator too): the hour each ad went live (hours from the start; ads live at the start
    # were born before it), and a standard normal per advertiser for its own CVR.
    ad_birth_hour: np.ndarray     # (G, S)
    advertiser_cvr_z: np.ndarray  # (A,)
    # Negative feedback (its own generator): how much each ad annoys, and how readily each user hides an ad.
    ad_neg_bias: np.ndarray       # (G, S)
    user_neg_bias: np.ndarray     # (U,)

    @property
    def n_slots(self) -> int:
        return len(self.slot_p)

    def ad_id(self, gen: np.ndarray, slot: np.ndarray) -> np.ndarray:
        return gen * self.n_slots + slot

    @staticmethod
    def campaign_of(slot: np.ndarray) -> np.ndarray:
        return slot // ADS_PER_CAMPAIGN

    @staticmethod
    def advertiser_of(slot: np.ndarray) -> np.ndarray:
        return slot // (ADS_PER_CAMPAIGN * CAMPAIGNS_PER_ADVERTISER)

    def category_of(self, slot: np.ndarray) -> np.ndarray:
        return self.advertiser_category[self.advertiser_of(slot)]

    def campaigns(self, start_ms: int) -> pd.DataFrame:
        """The campaign catalog as the ad server publishes it at ``start_ms`` (``schemas.events.Campaign``)."""
        c = np.arange(len(self.campaign_bid))
        return pd.DataFrame({
            "campaign_id": c.astype(np.int64),
            "advertiser_id": (c // CAMPAIGNS_PER_ADVERTISER).astype(np.int64),
            "category_id": self.advertiser_category[c // CAMPAIGNS_PER_ADVERTISER].astype(np.int64),
            "daily_budget": np.round(self.campaign_daily_budget, 2),
            "start_time_ms": (start_ms - self.campaign_age_days * 86_400_000).astype(np.int64),
            "event_time_ms": np.full(len(c), start_ms, dtype=np.int64),
        })


def build_world(cfg: SimulatorConfig, rng: np.random.Generator) -> World:
    d, n_hours = cfg.latent_dim, int(np.ceil(cfg.hours)) + 1
    scale = 1.0 / np.sqrt(d)
    user_ctr_f = rng.normal(0, 1, (cfg.users, d)) * scale
    user_cvr_f = rng.normal(0, 1, (cfg.users, d)) * scale
    # Churn: each hour a share of slots gets a new ad.
    churn_per_hour = cfg.ad_churn_per_day / 24.0
    steps = rng.random((n_hours, cfg.ads)) < churn_per_hour
    steps[0] = False
    generation = np.cumsum(steps, axis=0).astype(np.int64)
    g = int(generation.max()) + 1
    n_campaigns = cfg.ads // ADS_PER_CAMPAIGN + 1
    n_advertisers = n_campaigns // CAMPAIGNS_PER_ADVERTISER + 1
    catalog_rng = np.random.default_rng([cfg.seed, 1])
    effects_rng = np.random.default_rng([cfg.seed, 2])
    neg_rng = np.random.default_rng([cfg.seed, 3])
    birth = np.full((g, cfg.ads), np.inf)
    for k in range(g):
        live = generation == k
        birth[k] = np.where(live.any(axis=0), live.argmax(axis=0), np.inf)
    birth[0] = -effects_rng.uniform(0, 30 * 24, cfg.ads)
    return World(
        user_p=zipf_weights(cfg.users, cfg.user_zipf, rng),
        user_ctr_f=user_ctr_f,
        user_cvr_f=user_cvr_f,
        slot_p=zipf_weights(cfg.ads, cfg.ad_zipf, rng),
        generation=generation,
        ad_ctr_f=rng.normal(0, 1, (g, cfg.ads, d)) * scale,
        ad_cvr_f=rng.normal(0, 1, (g, cfg.ads, d)) * scale,
        ad_ctr_bias=rng.normal(0, 0.5, (g, cfg.ads)),
        ad_cvr_bias=rng.normal(0, 0.5, (g, cfg.ads)),
        campaign_bid=rng.lognormal(np.log(1.5), 0.5, n_campaigns),
        advertiser_category=catalog_rng.integers(0, N_CATEGORIES, n_advertisers),
        user_category_affinity=catalog_rng.normal(0, 0.6, (cfg.users, N_CATEGORIES)),
        campaign_daily_budget=catalog_rng.lognormal(np.log(300), 0.8, n_campaigns),
        campaign_age_days=catalog_rng.integers(0, 120, n_campaigns),
        ad_birth_hour=birth,
        advertiser_cvr_z=effects_rng.normal(0, 1, n_advertisers),
        ad_neg_bias=neg_rng.normal(0, 1.0, (g, cfg.ads)),
        user_neg_bias=neg_rng.normal(0, 0.7, cfg.users),
    )
