"""``python -m feature_repo.cli <feast command ...>``: the ``feast`` CLI on this project's lake and stores.

Writes ``<var>/feast/feature_store.yaml`` (``feature_repo.store.write_config``: Redis, or a loud error
when it is down) and runs ``feast -c feature_repo -f <that file> <command ...>`` with the settings in the
environment, so ``feast apply`` and ``feast materialize-incremental`` work as they do for any Feast repo.
A materialization whose interval holds a quarantined gold day is refused. After one succeeds, it records when
the gold views were loaded (``feature_repo.loads``): the
time their rows became readable online, which the training-set builder joins served impressions on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from feature_repo.loads import (
    QuarantinedDays,
    loads_path,
    parse_materialize,
    record,
    refuse_quarantined,
    stamps_present,
)
from feature_repo.store import REPO, OnlineStoreDown, write_config
from infra.settings import Settings, get_settings


def feast(args: list[str], settings: Settings | None = None, online: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run the feast CLI with ``args``; its output goes to this process's stdout/stderr."""
    settings = settings or get_settings()
    if args[:1] == ["apply"]:
        from feature_repo.store import ensure_offline_tables
        from infra.spark_session import spark_session

        ensure_offline_tables(spark_session("feast-apply", settings), settings)
    config = write_config(settings, online)
    exe = shutil.which("feast", path=str(Path(sys.executable).parent)) or "feast"
    env = {**os.environ, **settings.to_env()}
    loads, present = parse_materialize(args), None
    if loads is not None and loads.views:
        from infra.spark_session import spark_session

        present = stamps_present(spark_session("feast-loads", settings), settings, loads)
        refuse_quarantined(settings, present, "feature_repo.cli")
    done = subprocess.run([exe, "-c", str(REPO), "-f", str(config), *args], env=env, check=check)
    if present is not None and done.returncode == 0:
        from infra.spark_session import spark_session

        loaded_ms = record(spark_session("feast-loads", settings), settings, loads, present)
        print(f"feature_repo.cli: recorded the load of {', '.join(loads.views)} at {loaded_ms} in "
              f"{loads_path(settings)}", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__)
        return 2
    try:
        return feast(args, check=False).returncode
    except (OnlineStoreDown, QuarantinedDays) as exc:
        print(f"feature_repo.cli: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
