"""The conversion-delay curve F(e) = P(conversion by e after the click | it converts in the window).

Fitted with Kaplan-Meier (lifelines) over clicks: a converted click is an event at its delay, an
unconverted one is right-censored at its elapsed time (``as_of_ms`` - click time, at most the window; a
matured one at the window). 1 - S(e) is then the share of clicks converted by e, the CVR is
1 - S(window) and F(e) = (1 - S(e)) / (1 - S(window)). So clicks whose window is still open count for
what they tell, and no full window of history is needed. Beyond the longest follow-up observed, S is
held flat (``max_follow_up_s`` in the artifact): the CVR is then a lower bound and F reaches 1 there, i.e.
F is relative to the conversions that arrive within the follow-up and overstates the in-window F by the
share that arrives later (once a window has matured, ``max_follow_up_s`` is the window and this goes away).
In a fitted frame, a row without ``as_of_ms`` (no column, or NaN) is a matured label.
Optionally per segment (``--segment advertiser_id`` or ``campaign_id``): a segment with at least
``min_conversions`` conversions gets its own curve and CVR on the same grid, any other falls back to
the overall curve. Published as a versioned JSON artifact (with a PNG plot) under
``var/artifacts/delay_curve/``; the joiner and the trainers read the latest one.

``python -m label_joiner.delay_curve [--segment FIELD]`` fits from the matured labels plus the clicks
still open in the training examples (``read_observations``; their ``as_of_ms`` is the newest event time in
those two topics, never the wall clock), and publishes; with nothing to fit (no clicks or no conversions) it
prints one line with the counts to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from infra.settings import Settings, get_settings

GRID_POINTS = 200
SEGMENT_FIELDS = ("advertiser_id", "campaign_id")


@dataclass(frozen=True)
class DelayCurve:
    """A step CDF on a log-spaced grid of elapsed seconds, and the matured post-click CVR."""

    grid_s: list[float]
    cdf_values: list[float]
    cvr: float
    n_clicks: int
    n_conversions: int
    window_s: float
    version: str = ""
    # Per-segment curves on the same grid: segment value (as a string) -> cdf_values, cvr, n_clicks,
    # n_conversions. Empty when the curve was fitted overall only.
    segment_field: str | None = None
    segments: dict[str, dict] = field(default_factory=dict)
    # The longest elapsed time any click was followed for (the window once matured labels are in).
    max_follow_up_s: float | None = None

    def cdf(self, elapsed_s: float, segment: object = None) -> float:
        """F(e): share of (eventual, in-window) conversions that have arrived by ``elapsed_s``."""
        if elapsed_s >= self.window_s:
            return 1.0
        return float(np.interp(elapsed_s, self.grid_s, self._values(segment), left=0.0, right=1.0))

    def segment_cvr(self, segment: object = None) -> float:
        """The matured post-click CVR of ``segment`` (the overall one for an unknown segment)."""
        return self.segments.get(str(segment), {}).get("cvr", self.cvr) if segment is not None else self.cvr

    def eventual_conversion(self, elapsed_s: float, prior: float | None = None, segment: object = None) -> float:
        """P(converts eventually | not converted after ``elapsed_s``) = p (1 - F) / (1 - p F)."""
        p = self.segment_cvr(segment) if prior is None else prior
        f = self.cdf(elapsed_s, segment)
        return p * (1 - f) / (1 - p * f) if p * f < 1 else 0.0

    def _values(self, segment: object) -> np.ndarray:
        if segment is not None and (seg := self._segment_values.get(str(segment))) is not None:
            return seg
        return self._overall_values

    @cached_property
    def _overall_values(self) -> np.ndarray:
        return np.asarray(self.cdf_values)

    @cached_property
    def _segment_values(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v["cdf_values"]) for k, v in self.segments.items()}

    @classmethod
    def fit(cls, observed: pd.DataFrame, window_s: float, segment_field: str | None = None,
            min_conversions: int = 200) -> DelayCurve:
        """Fit on clicks (columns clicked, converted, click_time_ms, conversion_time_ms, optionally
        ``as_of_ms``, the time each was observed at, absent for matured labels, and ``segment_field``)."""
        clicks = observed.loc[observed["clicked"].astype(bool)]
        grid = np.unique(np.concatenate([[0.0], np.geomspace(1.0, window_s, GRID_POINTS)]))
        overall = _fit_on_grid(clicks, grid, window_s)
        if overall is None:
            raise NothingToFit(f"nothing to fit a delay curve on: {len(clicks):,} clicks, "
                               f"{int(clicks['converted'].sum()) if len(clicks) else 0} conversions")
        segments = {}
        if segment_field is not None:
            if segment_field not in SEGMENT_FIELDS:
                raise ValueError(f"segment field must be one of {SEGMENT_FIELDS}, not {segment_field!r}")
            for value, group in clicks.groupby(segment_field):
                fitted = _fit_on_grid(group, grid, window_s)
                if fitted is not None and fitted["n_conversions"] >= min_conversions:
                    segments[str(value)] = fitted
        follow_up = overall.pop("max_follow_up_s")
        for seg in segments.values():
            seg.pop("max_follow_up_s")
        return cls(grid_s=grid.tolist(), window_s=window_s, segment_field=segment_field, segments=segments,
                   max_follow_up_s=follow_up, **overall)

    # -- artifact ---------------------------------------------------------------------------------------
    def publish(self, settings: Settings) -> Path:
        """Write a new version and point ``latest.json`` at it; return the version's path."""
        folder = artifact_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        version = time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime())
        published = replace(self, version=version)
        path = folder / f"{version}.json"
        path.write_text(json.dumps(asdict(published)))
        published.plot(folder / f"{version}.png")
        (folder / "latest.json").write_text(json.dumps({"version": version, "path": path.name}))
        return path

    @classmethod
    def load_latest(cls, settings: Settings) -> DelayCurve | None:
        pointer = artifact_dir(settings) / "latest.json"
        if not pointer.exists():
            return None
        data = json.loads((artifact_dir(settings) / json.loads(pointer.read_text())["path"]).read_text())
        return cls(**data)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        hours = np.asarray(self.grid_s) / 3600
        largest = sorted(self.segments.items(), key=lambda kv: -kv[1]["n_conversions"])[:8]
        for value, seg in largest:
            ax.step(hours, seg["cdf_values"], where="post", alpha=0.5, linewidth=0.8,
                    label=f"{self.segment_field}={value} ({seg['n_conversions']:,})")
        ax.step(hours, self.cdf_values, where="post", color="black", linewidth=2, label="all")
        if largest:
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("hours after the click")
        ax.set_ylabel("share of conversions arrived, F(e)")
        ax.set_title(f"Conversion delay curve {self.version} ({self.n_conversions:,} conversions, "
                     f"CVR {self.cvr:.2%})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


class NothingToFit(ValueError):
    """No clicks or no conversions: there is no delay to learn from."""


def _fit_on_grid(clicks: pd.DataFrame, grid: np.ndarray, window_s: float) -> dict | None:
    """Kaplan-Meier on the clicks (conversions events, the rest censored), on ``grid``; None without
    conversions."""
    from lifelines import KaplanMeierFitter

    converted = clicks["converted"].to_numpy(bool)
    if not converted.any():
        return None
    click_t = clicks["click_time_ms"].to_numpy(float)
    delay_s = np.where(converted, (clicks["conversion_time_ms"].to_numpy(float) - click_t) / 1000.0, np.nan)
    followed_s = np.full(len(clicks), window_s)  # matured: followed for the whole window
    if "as_of_ms" in clicks:  # open clicks: followed up to the time they were observed at (NaN: matured)
        as_of = pd.to_numeric(clicks["as_of_ms"], errors="coerce").to_numpy(float)
        open_ = ~np.isnan(as_of)
        followed_s[open_] = np.clip((as_of[open_] - click_t[open_]) / 1000.0, 0.0, window_s)
    durations = np.where(converted, np.clip(delay_s, 0.0, window_s), followed_s)
    km = KaplanMeierFitter().fit(durations, event_observed=converted)
    converted_by = 1.0 - km.survival_function_at_times(grid).to_numpy()  # flat beyond the last time seen
    cvr = float(converted_by[-1])
    return {"cdf_values": np.clip(converted_by / cvr, 0.0, 1.0).tolist(), "cvr": cvr, "n_clicks": len(clicks),
            "n_conversions": int(converted.sum()), "max_follow_up_s": float(durations.max())}


def artifact_dir(settings: Settings) -> Path:
    return settings.var_dir / "artifacts" / "delay_curve"


def read_matured(settings: Settings) -> pd.DataFrame:
    """Every matured label currently in the topic (the latest per impression id)."""
    from infra.topics import read_topic
    from schemas.codec import InvalidEvent, decode
    from schemas.events import MaturedLabel

    rows = {}
    for record in read_topic(settings, settings.topics.matured_labels):
        try:
            label = decode(MaturedLabel, record.value, record.headers)
        except InvalidEvent:
            continue
        rows[label.impression_id] = label.model_dump()
    return pd.DataFrame(list(rows.values()))


def read_observations(settings: Settings) -> pd.DataFrame:
    """Matured labels, plus the clicks still open as the training examples show them, each with the time
    it was observed at (``as_of_ms``: the newest event time in those topics; matured rows have none)."""
    from infra.topics import read_topic
    from schemas.codec import InvalidEvent, decode
    from schemas.events import TrainingExample

    columns = ["impression_id", "clicked", "converted", "click_time_ms", "conversion_time_ms", "advertiser_id",
               "campaign_id"]
    matured = read_matured(settings)
    times = ["impression_time_ms", "click_time_ms", "conversion_time_ms"]
    newest = 0
    if len(matured):
        seen = matured[times].apply(pd.to_numeric, errors="coerce").max().max()  # NaN-skipping
        newest = int(seen) if pd.notna(seen) else 0
    matured = matured[columns] if len(matured) else pd.DataFrame(columns=columns)
    open_clicks: dict[str, dict] = {}
    for record in read_topic(settings, settings.topics.training_examples):
        try:
            ex = decode(TrainingExample, record.value, record.headers)
        except InvalidEvent:
            continue
        # as_of_ms is an event time too (the joiner emits an example once its event time passed it)
        newest = max(newest, ex.as_of_ms, ex.impression_time_ms, ex.click_time_ms or 0, ex.conversion_time_ms or 0)
        if not ex.clicked:
            continue
        row = open_clicks.setdefault(ex.impression_id, {
            "impression_id": ex.impression_id, "clicked": True, "converted": False, "click_time_ms": ex.click_time_ms,
            "conversion_time_ms": None, "advertiser_id": ex.advertiser_id, "campaign_id": ex.campaign_id})
        row["click_time_ms"] = ex.click_time_ms  # a correction may name an earlier click
        if ex.converted:
            row.update(converted=True, conversion_time_ms=ex.conversion_time_ms)
    done = set(matured["impression_id"])
    still_open = pd.DataFrame([r for k, r in open_clicks.items() if k not in done], columns=columns)
    if len(still_open):
        still_open["as_of_ms"] = newest
    frames = [f for f in (matured, still_open) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m label_joiner.delay_curve", description=__doc__)
    p.add_argument("--segment", choices=SEGMENT_FIELDS, help="also fit one curve per value of this field")
    p.add_argument("--min-conversions", type=int, default=200, help="a segment's own curve needs this many")
    a = p.parse_args(argv)
    settings = get_settings()
    observed = read_observations(settings)
    print(f"delay curve: {len(observed):,} impressions read (matured labels and open clicks)")
    try:
        curve = DelayCurve.fit(observed, settings.windows.conversion_window_s, a.segment, a.min_conversions)
    except NothingToFit as exc:
        print(f"delay curve: {exc}; nothing published", file=sys.stderr)
        return 1
    path = curve.publish(settings)
    print(f"delay curve: {curve.n_conversions:,} conversions, CVR {curve.cvr:.3%}, F(1h)={curve.cdf(3600):.2f}, "
          f"F(1d)={curve.cdf(86400):.2f}, {len(curve.segments)} segments with their own curve; "
          f"published {path} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
