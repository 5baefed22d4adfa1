"""UTC days: the partitions every batch job reads and writes.

>>> day_bounds(date(2026, 11, 2))
(1793577600000, 1793664000000)
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta


def day_bounds(ds: date) -> tuple[int, int]:
    """[start, end) of a UTC day in epoch milliseconds."""
    start = datetime(ds.year, ds.month, ds.day, tzinfo=UTC)
    return int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)


def day_end(ds: date) -> datetime:
    """The first instant after ``ds`` (a feature computed over ``ds`` is true from then on)."""
    return datetime(ds.year, ds.month, ds.day, tzinfo=UTC) + timedelta(days=1)


def days(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included."""
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]
