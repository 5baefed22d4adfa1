"""The conversion-delay curve F(e) = P(conversion by e after the click | it converts in the window).

Fitted on matured labels: once the window has closed, every in-window conversion delay is observed, so
the Kaplan-Meier estimate has no censored durations and equals the empirical CDF of the converters'
delays; it is computed directly with numpy. Published as a versioned JSON artifact (with a PNG plot)
under ``var/artifacts/delay_curve/``; the joiner and the trainers read the latest one.

``python -m label_joiner.delay_curve`` fits from the matured_labels topic and publishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from infra.settings import Settings, get_settings

GRID_POINTS = 200


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

    def cdf(self, elapsed_s: float) -> float:
        """F(e): share of (eventual, in-window) conversions that have arrived by ``elapsed_s``."""
        if elapsed_s >= self.window_s:
            return 1.0
        return float(np.interp(elapsed_s, self.grid_s, self.cdf_values, left=0.0, right=1.0))

    def eventual_conversion(self, elapsed_s: float, prior: float | None = None) -> float:
        """P(converts eventually | not converted after ``elapsed_s``) = p (1 - F) / (1 - p F)."""
        p, f = (self.cvr if prior is None else prior), self.cdf(elapsed_s)
        return p * (1 - f) / (1 - p * f) if p * f < 1 else 0.0

    @classmethod
    def fit(cls, matured: pd.DataFrame, window_s: float) -> DelayCurve:
        """Fit on matured labels (columns clicked, converted, click_time_ms, conversion_time_ms)."""
        clicks = matured[matured["clicked"]]
        conv = clicks[clicks["converted"]]
        delays = np.sort((conv["conversion_time_ms"] - conv["click_time_ms"]).to_numpy() / 1000.0)
        if len(delays) == 0:
            raise ValueError("no matured conversions to fit a delay curve on")
        grid = np.unique(np.concatenate([[0.0], np.geomspace(1.0, window_s, GRID_POINTS)]))
        cdf = np.searchsorted(delays, grid, side="right") / len(delays)
        return cls(grid_s=grid.tolist(), cdf_values=cdf.tolist(), cvr=len(conv) / max(len(clicks), 1),
                   n_clicks=len(clicks), n_conversions=len(conv), window_s=window_s)

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
        ax.step(hours, self.cdf_values, where="post")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("hours after the click")
        ax.set_ylabel("share of conversions arrived, F(e)")
        ax.set_title(f"Conversion delay curve {self.version} ({self.n_conversions:,} conversions, "
                     f"CVR {self.cvr:.2%})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


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


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m label_joiner.delay_curve", description=__doc__).parse_args(argv)
    settings = get_settings()
    matured = read_matured(settings)
    print(f"delay curve: {len(matured):,} matured labels read")
    curve = DelayCurve.fit(matured, settings.windows.conversion_window_s)
    path = curve.publish(settings)
    print(f"delay curve: {curve.n_conversions:,} conversions, CVR {curve.cvr:.3%}, F(1h)={curve.cdf(3600):.2f}, "
          f"F(1d)={curve.cdf(86400):.2f}; published {path} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
