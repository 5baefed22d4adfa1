"""The state behind the simulator's sequential effects (``SimulatorConfig.effects``): what each user saw,
clicked and converted so far. The open-loop generator and the closed loop both draw outcomes an hour at a time
and keep one :class:`Behaviour` across hours, so the truth of an impression depends on the user's past as the
features describe it (views of the ad that day, clicks in the ad's category, conversions).

>>> from streams.simulator.config import Effects, SimulatorConfig
>>> cfg = SimulatorConfig(users=2, ads=10, effects=Effects(fatigue_logit=1.0))
>>> b = Behaviour(cfg, users=2)
>>> user, ad, cat, t = np.array([0, 0, 1]), np.array([5, 5, 5]), np.array([0, 0, 0]), np.array([0, 1, 2])
>>> np.round(b.ctr_logit(user, ad, cat, cfg.start_ms + t), 3).tolist()  # the second view of ad 5 by user 0
[0.0, -0.693, 0.0]
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from schemas.features import N_CATEGORIES
from streams.simulator.config import SimulatorConfig

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
AD_BITS = 24  # ad ids below 2^24 (slots x generations)


class Behaviour:
    """Views per (UTC day, user, ad), the last click per user and category, conversions per user."""

    def __init__(self, cfg: SimulatorConfig, users: int):
        self.cfg, self.e = cfg, cfg.effects
        self.users = users
        self.views = pd.Series(dtype=np.int64)  # key (see ``_view_keys``) -> views so far that day
        self.last_click_h = np.full((users, N_CATEGORIES), -np.inf)  # hours from the start
        self.conversions = np.zeros(users)
        self.pending_ms = np.zeros(0, dtype=np.int64)  # conversions that have not happened yet
        self.pending_user = np.zeros(0, dtype=np.int64)

    def _day(self, t_ms: np.ndarray | int) -> np.ndarray:
        return (np.asarray(t_ms, dtype=np.int64) - self.cfg.start_ms) // DAY_MS

    def _view_keys(self, user: np.ndarray, ad_id: np.ndarray, t_ms: np.ndarray) -> np.ndarray:
        """One int64 per (UTC day, user, ad); the day is ``key // (users << AD_BITS)``."""
        return ((self._day(t_ms) * self.users + np.asarray(user, dtype=np.int64)) << AD_BITS) + np.asarray(ad_id)

    def advance(self, now_ms: int) -> None:
        """Count the conversions that have happened by ``now_ms``."""
        done = self.pending_ms <= now_ms
        if done.any():
            np.add.at(self.conversions, self.pending_user[done], 1.0)
            self.pending_ms, self.pending_user = self.pending_ms[~done], self.pending_user[~done]

    def ctr_logit(self, user: np.ndarray, ad_id: np.ndarray, category: np.ndarray, t_ms: np.ndarray,
                  within: bool = True) -> np.ndarray:
        """The sequential part of each impression's click logit. ``within``: earlier rows of this batch count as
        views (impressions in time order); otherwise only the views observed before."""
        out = np.zeros(len(user))
        if self.e.fatigue_logit:
            keys = self._view_keys(user, ad_id, t_ms)
            earlier = self.views.reindex(keys).fillna(0).to_numpy(dtype=np.float64)
            if within:
                earlier = earlier + pd.Series(keys).groupby(keys).cumcount().to_numpy()
            out -= self.e.fatigue_logit * np.log1p(earlier)
        if self.e.recency_logit:
            now_h = (np.asarray(t_ms, dtype=np.float64) - self.cfg.start_ms) / HOUR_MS
            since = np.maximum(now_h - self.last_click_h[user, category], 0.0)
            out += self.e.recency_logit * np.exp2(-since / self.e.recency_half_life_h)
        return out

    def cvr_logit(self, user: np.ndarray) -> np.ndarray:
        """The sequential part of each click's conversion logit."""
        if not self.e.converter_logit:
            return np.zeros(len(user))
        return self.e.converter_logit * np.log1p(self.conversions[user])

    def observe(self, user: np.ndarray, ad_id: np.ndarray, category: np.ndarray, t_ms: np.ndarray,
                clicked: np.ndarray, click_ms: np.ndarray, converts: np.ndarray, conversion_ms: np.ndarray) -> None:
        """Remember a drawn batch: its views, the clicks' times per category and the conversions to come."""
        if self.e.fatigue_logit and len(user):
            keys = self._view_keys(user, ad_id, t_ms)
            self.views = self.views.add(pd.Series(keys).value_counts(), fill_value=0)
            today = self._day(np.asarray(t_ms).max())
            self.views = self.views[self.views.index // (self.users << AD_BITS) >= today]  # fatigue is per day
        if clicked.any():
            hours = (np.asarray(click_ms, dtype=np.float64)[clicked] - self.cfg.start_ms) / HOUR_MS
            np.maximum.at(self.last_click_h, (user[clicked], category[clicked]), hours)
        if converts.any():
            self.pending_ms = np.concatenate([self.pending_ms, np.asarray(conversion_ms, dtype=np.int64)[converts]])
            self.pending_user = np.concatenate([self.pending_user, np.asarray(user, dtype=np.int64)[converts]])
