"""Measure the joiner against the simulator's ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from infra.settings import WindowSettings

DEFECTS = ("impression_malformed", "impression_late", "click_malformed", "click_late", "conversion_malformed",
           "conversion_late")


def expected_labels(truth: pd.DataFrame, windows: WindowSettings) -> pd.DataFrame:
    """Labels the join must produce for every impression whose events all arrived intact and in time."""
    clean = truth[~truth[list(DEFECTS)].any(axis=1)]
    converted = clean["converts"] & (clean["conversion_delay_s"] <= windows.conversion_window_s)
    return pd.DataFrame({"clicked": clean["clicked"].to_numpy(), "converted": converted.to_numpy()},
                        index=pd.Index(clean["impression_id"], name="impression_id"))


@dataclass
class JoinAccuracy:
    expected: int
    compared: int
    missing: int
    click_mismatches: int
    conversion_mismatches: int

    @property
    def exact(self) -> bool:
        return self.missing == 0 and self.click_mismatches == 0 and self.conversion_mismatches == 0


def join_accuracy(matured: pd.DataFrame, truth: pd.DataFrame, windows: WindowSettings) -> JoinAccuracy:
    """Compare matured labels (one row per impression id) with the truth, impression by impression."""
    want = expected_labels(truth, windows)
    got = matured.set_index("impression_id")
    common = want.index.intersection(got.index)
    g, w = got.loc[common], want.loc[common]
    return JoinAccuracy(expected=len(want), compared=len(common), missing=len(want) - len(common),
                        click_mismatches=int((g["clicked"] != w["clicked"]).sum()),
                        conversion_mismatches=int((g["converted"] != w["converted"]).sum()))
