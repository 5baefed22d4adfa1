"""The soak's verdict (pure logic): a metric that keeps growing after the state has filled is flagged, one that
plateaus is not. The soak itself is `make soak` (about 15 min, outside CI)."""

from __future__ import annotations

from infra.soak import verdicts


def _rows(fn) -> list[dict]:
    return [{"sim_day": d / 4, "state_mb:flat": fn(d / 4, True), "state_mb:leak": fn(d / 4, False),
             "lag:gone": None} for d in range(0, 30 * 4)]


def test_a_leak_is_flagged_and_a_plateau_is_not():
    # Fills for 9 days (the conversion window and its lateness), then flat; the leak grows 20 MB a day for ever.
    rows = _rows(lambda day, flat: min(day, 9) * 50 if flat else day * 20)
    result = {name: (a, b, ok) for name, a, b, ok in verdicts(rows, days=30)}
    assert result["state_mb:flat"] == (450, 450, True)
    assert result["state_mb:leak"][2] is False
    assert "lag:gone" not in result  # a metric never read has no verdict rather than a made-up one


def test_noise_within_the_slack_is_not_growth():
    rows = _rows(lambda day, flat: 1.0 + (day > 25) * 10.0)  # a 10 MB bump late in the run: under the 16 MB slack
    assert all(ok for *_, ok in verdicts(rows, days=30))
