"""Knobs of the traffic simulator. Every rate here is a target the tests check the output against."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field


def recent_start(days_back: int = 9) -> datetime:
    """Midnight UTC ``days_back`` days ago: a run and its conversion window (7 days) lie in the past, and
    every record's timestamp stays inside the raw topics' retention (14 days)."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_back)


class Effects(BaseModel):
    """Effects in the truth that the feature service is built to see (all off by default, so a seed's world and
    traffic stay as they were; :meth:`realistic` turns them on). Each is a logit added to the hidden truth, on
    top of the latent user x ad part:

    - fatigue: CTR falls by ``fatigue_logit`` x log(1 + earlier views of the same ad by the user that UTC day);
    - recency: CTR rises by ``recency_logit`` x 2^(-hours since the user's last click in the ad's category /
      ``recency_half_life_h``), counting the clicks on impressions of earlier hours;
    - novelty: a new ad's CTR rises by ``novelty_logit`` x 2^(-ad age / ``novelty_half_life_h``);
    - hour of day: CTR moves by ``hour_logit`` x cos(2 pi (hour - 20) / 24) (peak at 20:00 UTC);
    - advertiser: each advertiser's CVR logit moves by a draw of sd ``advertiser_cvr_sd``;
    - converters: CVR rises by ``converter_logit`` x log(1 + the user's conversions before the hour).
    """

    fatigue_logit: float = Field(default=0.0, ge=0)
    recency_logit: float = Field(default=0.0, ge=0)
    recency_half_life_h: float = Field(default=6.0, gt=0)
    novelty_logit: float = Field(default=0.0, ge=0)
    novelty_half_life_h: float = Field(default=48.0, gt=0)
    hour_logit: float = Field(default=0.0, ge=0)
    advertiser_cvr_sd: float = Field(default=0.0, ge=0)
    converter_logit: float = Field(default=0.0, ge=0)

    @classmethod
    def realistic(cls) -> Effects:
        return cls(fatigue_logit=0.6, recency_logit=1.0, novelty_logit=0.8, hour_logit=0.3, advertiser_cvr_sd=0.8,
                   converter_logit=0.5)

    @property
    def sequential(self) -> bool:
        """Whether the truth depends on earlier impressions and outcomes (drawn hour by hour)."""
        return bool(self.fatigue_logit or self.recency_logit or self.converter_logit)


class SimulatorConfig(BaseModel):
    seed: int = 7
    run_id: str | None = Field(default=None, description="prefix of every id; default sim<seed>")
    # Records are stamped with their simulated delivery time (the producer's clock in the simulated
    # world), so the simulated world must lie in the real past: pass a fixed start to repeat a run exactly.
    start: datetime = Field(default_factory=recent_start)
    hours: float = Field(default=3.0, gt=0)
    users: int = Field(default=100_000, gt=0)
    ads: int = Field(default=20_000, gt=0, description="ad slots live at any time")
    impressions_per_hour: float = Field(default=20_000, gt=0)
    # Popularity: Zipf exponents of user activity and ad popularity.
    user_zipf: float = 1.05
    ad_zipf: float = 1.1
    latent_dim: int = 8
    # Targets of the true probabilities, averaged over the run.
    ctr: float = Field(default=0.03, gt=0, lt=1)
    cvr: float = Field(default=0.02, gt=0, lt=1, description="P(conversion ever | click)")
    # Click delay (seconds after the impression, always inside the click window): lognormal.
    click_delay_median_s: float = 4.0
    click_delay_sigma: float = 0.8
    # Conversion delay: a fast exponential part and a slow lognormal tail that crosses the window.
    conv_fast_share: float = Field(default=0.5, ge=0, le=1)
    conv_fast_mean_s: float = 3600.0
    conv_slow_median_s: float = 3 * 86400.0
    conv_slow_sigma: float = 1.0
    # Negative feedback (hides and reports, ``schemas.events.NegativeFeedback``): the mean chance per impression,
    # the share that are reports, and the delay after the impression (lognormal, always inside the feedback window).
    neg_rate: float = Field(default=0.005, gt=0, lt=1)
    report_share: float = Field(default=0.15, ge=0, le=1)
    feedback_delay_median_s: float = 8.0
    feedback_delay_sigma: float = 0.8
    # Delivery defects (shares of events).
    duplicate_share: float = Field(default=0.01, ge=0, le=1)
    out_of_order_share: float = Field(default=0.02, ge=0, le=1)
    out_of_order_max_s: float = 120.0
    late_share: float = Field(default=0.003, ge=0, le=1)
    malformed_share: float = Field(default=0.002, ge=0, le=1)
    delivery_jitter_mean_s: float = 1.0
    # Drift and churn.
    drift_logit_per_day: float = -0.1
    diurnal_amplitude: float = 0.3
    ad_churn_per_day: float = 0.05
    # An abrupt drift (a vertical's season starts): from ``shock_hour`` on, the CTR logit of the ads of the
    # first ``shock_categories`` categories moves by ``shock_logit`` and the others' by minus that.
    shock_hour: float | None = Field(default=None, ge=0)
    shock_logit: float = 1.0
    shock_categories: int = Field(default=8, ge=0)
    effects: Effects = Field(default_factory=Effects)
    prediction_log: bool = True
    # Pacing: simulated seconds per wall-clock second; 0 sends as fast as the producer can.
    speed: float = Field(default=720.0, ge=0)

    @property
    def prefix(self) -> str:
        return self.run_id or f"sim{self.seed}"

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.hours * 3600 * 1000)
