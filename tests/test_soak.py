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
    result = {name: (top, growth, ok) for name, top, growth, _allowed, ok in verdicts(rows, days=30)}
    assert result["state_mb:flat"][0] == 450 and abs(result["state_mb:flat"][1]) < 1e-6 and result["state_mb:flat"][2]
    assert result["state_mb:leak"][2] is False and result["state_mb:leak"][1] > 350  # 20 MB a day for ~20 days
    assert "lag:gone" not in result  # a metric never read has no verdict rather than a made-up one


def test_a_sawtooth_is_not_growth():
    # Memtables filling and flushing, files compacted: up and down every 4 days, no trend.
    rows = _rows(lambda day, flat: 10.0 + 30.0 * ((day % 4) / 4))
    assert all(ok for *_, ok in verdicts(rows, days=30))
