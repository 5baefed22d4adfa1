"""A/B buckets: users hash into ``buckets`` buckets; ranges of buckets are arms served by a model version.

``settings.serving.experiment`` maps an arm to ``(first bucket, last bucket + 1, version)`` where the version is
a registry id (pinned: that arm keeps that model) or ``"promoted"`` (the arm follows promotions). Users whose
bucket no arm covers are in the arm ``"rest"`` on the promoted model; without an experiment everyone is in the
arm ``"all"`` on the promoted model. The hash is blake2b of the salt and the user id: stable across processes
and machines, and a new salt reshuffles users for a new experiment.

>>> exp = Experiment({"control": (0, 500, "promoted"), "treatment": (500, 1000, "v000007-warm")}, 1000, "ab1")
>>> exp.arm_of(42) in (("control", "promoted"), ("treatment", "v000007-warm"))
True
>>> Experiment({"a": (0, 600, "promoted"), "b": (500, 1000, "promoted")}, 1000, "s")
Traceback (most recent call last):
...
ValueError: experiment arms 'a' [0, 600) and 'b' [500, 1000) overlap
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence

PROMOTED = "promoted"
ALL = "all"  # the arm of everyone when no experiment runs
REST = "rest"  # the arm of users whose bucket no arm covers


def bucket(user_id: int, salt: str, buckets: int) -> int:
    """The user's bucket in ``0 .. buckets - 1`` (blake2b, stable; never Python's salted ``hash()``)."""
    digest = hashlib.blake2b(f"{salt}:{int(user_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


class Experiment:
    """Arms as bucket ranges; :meth:`arm_of` tells a user's arm and the model version it is served."""

    def __init__(self, arms: Mapping[str, Sequence], buckets: int, salt: str) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        ranges = []
        for arm, spec in arms.items():
            if not arm or arm in (ALL, REST):
                raise ValueError(f"experiment arm name {arm!r} is reserved or empty")
            if len(spec) != 3:
                raise ValueError(f"experiment arm {arm!r} must be (first bucket, last bucket + 1, version), got {spec}")
            lo, hi, version = int(spec[0]), int(spec[1]), str(spec[2])
            if not 0 <= lo < hi <= buckets:
                raise ValueError(f"experiment arm {arm!r} range [{lo}, {hi}) is empty or outside [0, {buckets})")
            if not version:
                raise ValueError(f"experiment arm {arm!r} names no model version (a registry id or 'promoted')")
            ranges.append((lo, hi, arm, version))
        ranges.sort()
        for (lo1, hi1, a1, _), (lo2, hi2, a2, _) in zip(ranges, ranges[1:], strict=False):
            if lo2 < hi1:
                raise ValueError(f"experiment arms {a1!r} [{lo1}, {hi1}) and {a2!r} [{lo2}, {hi2}) overlap")
        self.buckets, self.salt, self.ranges = buckets, salt, ranges
        self._starts = [r[0] for r in ranges]

    @classmethod
    def from_settings(cls, settings) -> Experiment:
        s = settings.serving
        return cls(s.experiment, s.buckets, s.experiment_salt)

    @property
    def active(self) -> bool:
        return bool(self.ranges)

    def pinned_versions(self) -> list[str]:
        """The registry versions some arm is pinned to."""
        return sorted({v for _, _, _, v in self.ranges if v != PROMOTED})

    def arm_of(self, user_id: int) -> tuple[str, str]:
        """(arm, model version or ``"promoted"``) of a user."""
        if not self.ranges:
            return ALL, PROMOTED
        b = bucket(user_id, self.salt, self.buckets)
        i = bisect.bisect_right(self._starts, b) - 1
        if i >= 0 and b < self.ranges[i][1]:
            return self.ranges[i][2], self.ranges[i][3]
        return REST, PROMOTED
