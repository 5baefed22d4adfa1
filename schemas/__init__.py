"""One source of truth for every event and table (see ``schemas.events``)."""

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import (
    ALL_EVENTS,
    Campaign,
    Click,
    Conversion,
    DeadLetter,
    Event,
    Impression,
    MaturedLabel,
    NegativeFeedback,
    PredictionLog,
    TrainingExample,
)

__all__ = [
    "ALL_EVENTS", "Campaign", "Click", "Conversion", "DeadLetter", "Event", "Impression", "InvalidEvent",
    "MaturedLabel", "NegativeFeedback", "PredictionLog", "TrainingExample", "decode", "encode",
]
