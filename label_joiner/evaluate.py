"""Measure the joiner against the simulator's ground truth, with the join's own rules."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from label_joiner.rules import Rules


def expected_labels(truth: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """The labels the join must produce for every impression that arrived intact and in time.

    Arrival is the simulator's delivery time (the Kafka timestamp it stamps), so late clicks and
    impressions drop out, and late conversions count as long as they arrived before their click's
    conversion window plus the conversions' lateness closed."""
    for kind in ("impression", "click", "conversion", "negative_feedback"):  # a run without any event of a kind
        if f"{kind}_malformed" not in truth:                                   # lacks its columns
            truth = truth.assign(**{f"{kind}_malformed": False, f"{kind}_delivery_ms": -1})
    imp_t = truth["event_time_ms"]
    kept = ~truth["impression_malformed"] & rules.impression_arrived_in_time(imp_t, truth["impression_delivery_ms"])
    clean = truth[kept]
    imp_t = clean["event_time_ms"]
    clicked = (clean["clicked"] & ~clean["click_malformed"]
               & rules.click_in_window(imp_t, clean["click_time_ms"])
               & rules.click_arrived_in_time(imp_t, clean["click_delivery_ms"]))
    converted = (clicked & clean["converts"] & ~clean["conversion_malformed"]
                 & rules.conversion_in_window(clean["click_time_ms"], clean["conversion_time_ms"])
                 & rules.conversion_arrived_in_time(clean["click_time_ms"], clean["conversion_delivery_ms"]))
    negative = (clean["negative"] & ~clean["negative_feedback_malformed"]
                & rules.feedback_in_window(imp_t, clean["feedback_time_ms"])
                & rules.feedback_arrived_in_time(imp_t, clean["negative_feedback_delivery_ms"]))
    return pd.DataFrame({"clicked": clicked.to_numpy(), "converted": converted.to_numpy(),
                         "negative_feedback": negative.to_numpy()},
                        index=pd.Index(clean["impression_id"], name="impression_id"))


@dataclass
class JoinAccuracy:
    expected: int
    compared: int
    missing: int
    unexpected: int
    click_mismatches: int
    conversion_mismatches: int
    feedback_mismatches: int = 0

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.click_mismatches or self.conversion_mismatches
                    or self.feedback_mismatches)


def join_accuracy(matured: pd.DataFrame, truth: pd.DataFrame, rules: Rules) -> JoinAccuracy:
    """Compare matured labels (one row per impression id) with the truth, impression by impression."""
    want = expected_labels(truth, rules)
    got = matured.drop_duplicates("impression_id").set_index("impression_id")
    common = want.index.intersection(got.index)
    g, w = got.loc[common], want.loc[common]
    return JoinAccuracy(expected=len(want), compared=len(common), missing=len(want) - len(common),
                        unexpected=len(got.index.difference(want.index)),
                        click_mismatches=int((g["clicked"] != w["clicked"]).sum()),
                        conversion_mismatches=int((g["converted"] != w["converted"]).sum()),
                        feedback_mismatches=int((g["negative_feedback"] != w["negative_feedback"]).sum()))
