"""Every event and table of the pipeline, defined once.

Each class is a pydantic model: its fields are the record's fields, its constraints are the checks
every consumer applies. Kafka (de)serialization (``schemas.codec``), faust Records
(``schemas.faust_records``), Spark StructTypes (``schemas.spark``) and data-quality expectations are
all derived from these classes; nothing else lists the fields.

Times are UTC epoch milliseconds of *event time* (``*_ms``); durations are seconds (``*_s``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Probability = Field(ge=0.0, le=1.0)
EpochMs = Field(ge=0, description="UTC epoch milliseconds")


class Event(BaseModel):
    """Base of every record. ``NAME``/``VERSION`` travel in the Kafka ``schema`` header."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    NAME: ClassVar[str]
    VERSION: ClassVar[int] = 1
    # Field whose value is the Kafka message key.
    KEY: ClassVar[str] = "impression_id"

    @classmethod
    def schema_id(cls) -> str:
        return f"{cls.NAME}/v{cls.VERSION}"

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    def key(self) -> str:
        return str(getattr(self, self.KEY))


class Impression(Event):
    """An ad shown to a user, with what serving used to rank it."""

    NAME: ClassVar[str] = "impression"

    impression_id: str = Field(min_length=1)
    request_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    advertiser_id: int = Field(ge=0)
    campaign_id: int = Field(ge=0)
    placement: str = Field(min_length=1)
    position: int = Field(ge=0, le=100)
    device: str = Field(min_length=1)
    bid: float = Field(ge=0.0)
    event_time_ms: int = EpochMs
    model_version: str
    served_pctr: float = Probability
    served_pcvr: float = Probability
    # Key of the prediction_log record holding the exact feature vector serving scored.
    feature_ref: str


class Click(Event):
    """A click on an impression."""

    NAME: ClassVar[str] = "click"

    click_id: str = Field(min_length=1)
    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    event_time_ms: int = EpochMs


class Conversion(Event):
    """A conversion attributed (last click) to a click."""

    NAME: ClassVar[str] = "conversion"

    conversion_id: str = Field(min_length=1)
    click_id: str = Field(min_length=1)
    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    event_time_ms: int = EpochMs
    value: float = Field(ge=0.0)


class NegativeFeedback(Event):
    """A user's negative feedback on an impression: ``hide`` (not interested) or ``report`` (offensive,
    misleading). The joiner counts the earliest one within the feedback window after the impression; it
    trains the ranker's negative-feedback tower, whose pNeg enters the auction as (1 - pNeg)^q."""

    NAME: ClassVar[str] = "negative_feedback"

    feedback_id: str = Field(min_length=1)
    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    kind: Literal["hide", "report"]
    event_time_ms: int = EpochMs


# The simulator's own serving stand-in (uniform serving, no ranker): its impressions have no replayable log.
BASELINE_MODEL_VERSION = "sim-serving-v1"


class PredictionLog(Event):
    """One candidate serving showed, as it scored it: the exact model inputs, the model version, the scores
    and the auction's outcome. Training replays these (log-and-replay) instead of recomputing features.

    ``features`` holds the scalar model inputs by column name (``<view>__<feature>``; a feature the store
    had no value for is absent), ``feature_lists`` the list-valued ones (the user's recent ads, the
    category profile). ``impression_id`` is the impression this candidate became (the record's key, and
    the impression's ``feature_ref``). ``read_ms`` is when serving read the online store (its clock, just
    before the read); ``ad_read_ms`` and ``advertiser_read_ms`` are when the read path's cache read the shown
    ad's rows. The training-set builder shows an impression only the feature rows written before them
    (point-in-time by availability). Version 1 records (no context, no auction fields) and version 2 records
    (no read times) still decode.
    """

    NAME: ClassVar[str] = "prediction_log"
    VERSION: ClassVar[int] = 3

    request_id: str = Field(min_length=1)
    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    model_version: str
    event_time_ms: int = EpochMs
    features: dict[str, float]
    pctr: float = Probability
    pcvr: float = Probability
    # Version 2: the request's context and the candidate's catalog ids, as the model saw them.
    advertiser_id: int = Field(default=0, ge=0)
    campaign_id: int = Field(default=0, ge=0)
    category_id: int = Field(default=-1, ge=-1)
    placement: str = ""
    device: str = ""
    position: int = Field(default=0, ge=0, le=100)
    bid: float = Field(default=0.0, ge=0.0)
    feature_lists: dict[str, list[float]] = Field(default_factory=dict)
    # The auction: expected revenue per thousand impressions, the second price charged per conversion,
    # whether the slot went to exploration, and the A/B arm of the user's bucket.
    ecpm: float = Field(default=0.0, ge=0.0)
    price: float = Field(default=0.0, ge=0.0)
    explored: bool = False
    arm: str = ""
    # Version 3: when the features were read (epoch ms of serving's clock; -1: unknown): the request's read (user
    # and user x category rows), and the shown ad's ad row and advertiser row, which the read path caches.
    read_ms: int = Field(default=-1, ge=-1)
    ad_read_ms: int = Field(default=-1, ge=-1)
    advertiser_read_ms: int = Field(default=-1, ge=-1)
    # When the cache last found the shown ad's rows still the store's: ``read_ms`` minus this is the staleness.
    ad_checked_ms: int = Field(default=-1, ge=-1)


class TrainingExample(Event):
    """One example for the streaming trainer, emitted before the conversion window closes.

    ``weight`` and ``label_*`` follow the delay-correction scheme named in ``scheme``; an example with
    ``is_correction`` set supersedes an earlier one for the same impression. ``example_id`` is the same on
    every replay (readers drop repeats by it); ``as_of_ms`` is the event time the example describes.
    """

    NAME: ClassVar[str] = "training_example"
    VERSION: ClassVar[int] = 3

    example_id: str = Field(min_length=1)
    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    advertiser_id: int = Field(ge=0)
    campaign_id: int = Field(ge=0)
    placement: str
    position: int = Field(ge=0)
    device: str
    model_version: str
    impression_time_ms: int = EpochMs
    clicked: bool
    converted: bool
    scheme: str
    label_ctr: float = Probability
    label_ctcvr: float = Probability
    weight: float = Field(ge=0.0)
    as_of_ms: int = EpochMs
    click_time_ms: int | None = None
    conversion_time_ms: int | None = None
    elapsed_since_click_s: float | None = Field(default=None, ge=0.0)
    delay_cdf: float | None = Field(default=None, ge=0.0, le=1.0)
    is_correction: bool = False
    # Version 3: negative feedback within its window (1/0), on the examples emitted once that window closed
    # (the no-click example); None where it was not known yet (click examples are emitted at the click).
    label_neg: float | None = Field(default=None, ge=0.0, le=1.0)


class MaturedLabel(Event):
    """Final labels of one impression, once both attribution windows have closed."""

    NAME: ClassVar[str] = "matured_label"
    VERSION: ClassVar[int] = 2

    impression_id: str = Field(min_length=1)
    user_id: int = Field(ge=0)
    ad_id: int = Field(ge=0)
    advertiser_id: int = Field(ge=0)
    campaign_id: int = Field(ge=0)
    impression_time_ms: int = EpochMs
    clicked: bool
    converted: bool
    click_time_ms: int | None = None
    conversion_time_ms: int | None = None
    conversion_value: float = Field(default=0.0, ge=0.0)
    # Version 2: a hide or report within the feedback window (version 1 records decode as False).
    negative_feedback: bool = False


class Campaign(Event):
    """A campaign as the ad server's catalog describes it: one record per version, keyed by campaign.

    The gold features read its category (the advertiser's vertical), daily budget and start time."""

    NAME: ClassVar[str] = "campaign"
    KEY: ClassVar[str] = "campaign_id"

    campaign_id: int = Field(ge=0)
    advertiser_id: int = Field(ge=0)
    category_id: int = Field(ge=0, le=999)
    daily_budget: float = Field(ge=0.0)
    start_time_ms: int = EpochMs
    event_time_ms: int = EpochMs


class LabeledImpression(MaturedLabel):
    """A silver row: an impression's matured labels joined to what serving knew when it showed the ad."""

    NAME: ClassVar[str] = "labeled_impression"

    category_id: int = Field(ge=0, le=999)
    placement: str = Field(min_length=1)
    position: int = Field(ge=0, le=100)
    device: str = Field(min_length=1)
    bid: float = Field(ge=0.0)


class DeadLetter(Event):
    """An input that could not be used, with the reason; nothing bad is dropped silently.

    ``dead_letter_id`` names the input (stage, topic, partition, offset), so a replay repeats the same id;
    ``arrival_ms`` is the input record's Kafka timestamp. A payload over 64 KiB is cut (``truncated``)."""

    NAME: ClassVar[str] = "dead_letter"
    VERSION: ClassVar[int] = 2
    KEY: ClassVar[str] = "source_topic"

    dead_letter_id: str = Field(min_length=1)
    source_topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    stage: str
    reason: str
    payload: str
    arrival_ms: int = Field(ge=-1, description="Kafka timestamp of the input record; -1 when unknown")
    truncated: bool = False


# The records that travel on Kafka (LabeledImpression is a lake table: Delta only).
ALL_EVENTS: tuple[type[Event], ...] = (
    Impression, Click, Conversion, NegativeFeedback, PredictionLog, TrainingExample, MaturedLabel, Campaign, DeadLetter,
)
BY_SCHEMA_ID: dict[str, type[Event]] = {cls.schema_id(): cls for cls in ALL_EVENTS}
