"""``make chaos`` in its reduced form: two short simulated days while every always-on process is killed with
``kill -9``, the broker and Redis restart and two Spark jobs are killed mid-run; nothing lost, nothing twice.

About 14 minutes here: marker ``fault``, run by ``make chaos-test`` and left out of ``make test`` (CI keeps the
single-fault tests: the joiner's kill -9 loop and broker restart, the real-time worker through a Redis outage,
bronze killed mid-run, the prediction logger through a broker restart)."""

from __future__ import annotations

import pytest

from infra import chaos

pytestmark = pytest.mark.fault


def test_chaos_loses_and_duplicates_nothing():
    done = chaos.run(hours=12, impressions_per_hour=150.0, speed=2880.0, seed=7)
    checks = chaos.check_all(done)
    chaos.write_report(done, checks)
    injected = [f.what for f in done.faults]
    for what in ("kill -9 label joiner", "kill -9 real-time features", "kill -9 scoring service",
                 "kill -9 online trainer", "restart Kafka broker", "restart Redis"):
        assert what in injected, f"{what} was not injected: {injected}"
    spark_kills = [f.detail for f in done.faults if f.what == "kill -9 Spark job"]
    assert len(spark_kills) == 2 and all("'killed_mid_run': True" in d for d in spark_kills), spark_kills
    assert done.fallbacks["requests"] > 0, "the scoring service was never down while the ad server asked it"
    for c in checks:
        assert c.checked > 0, c
    failed = [c for c in checks if not c.ok]
    assert not failed, failed
