"""The local state directory of one consumer group: a folder per task, each guarded by a lock file.

Workers of one group on one machine share ``<state_dir>/<group>/``. As Kafka Streams' StateDirectory does, a
process takes an exclusive lock (``flock``) on ``<task>.lock`` before it opens a task's store and keeps it while it
owns the task, so two processes never open one store (a fenced zombie still closing, or a second worker started
by hand). Folders of tasks that no process owns are deleted once untouched for ``cleanup_delay_s``: they would
otherwise stay on disk for ever, and be trusted as-is if the task came back weeks later (its changelog checkpoint
is checked on restore anyway, see ``Engine.restore_task``).

>>> import tempfile
>>> d = StateDirectory(Path(tempfile.mkdtemp()))
>>> path = d.lock(0); path.mkdir(); d.lock(0) == path
True
>>> d.clean_unowned(owned=set(), cleanup_delay_s=0)  # task 0 is locked by this process: kept
[]
>>> d.unlock(0); d.clean_unowned(owned=set(), cleanup_delay_s=0)
[0]
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path


class TaskLocked(RuntimeError):
    """Another process on this machine holds the task's lock."""


class StateDirectory:
    def __init__(self, root: Path):
        self.root = root
        self._locks: dict[int, int] = {}  # task -> open lock file descriptor

    def task_path(self, task: int) -> Path:
        return self.root / str(task)

    def lock(self, task: int) -> Path:
        """Take the task's lock (idempotent in this process); raise :class:`TaskLocked` if another process holds
        it. Return the task's folder."""
        if task not in self._locks:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = self._try_lock(task)
            if fd is None:
                raise TaskLocked(f"task {task}'s state in {self.root} is locked by another process on this machine")
            self._locks[task] = fd
        return self.task_path(task)

    def unlock(self, task: int) -> None:
        fd = self._locks.pop(task, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def clean_unowned(self, owned: set[int], cleanup_delay_s: float) -> list[int]:
        """Delete the folders of tasks not in ``owned``, not locked by any process and untouched for
        ``cleanup_delay_s``; return the tasks deleted."""
        cleaned = []
        if not self.root.is_dir():
            return cleaned
        now = time.time()
        for path in sorted(self.root.iterdir()):
            if not (path.is_dir() and path.name.isdigit()):
                continue
            task = int(path.name)
            if task in owned or task in self._locks or now - _last_modified(path) < cleanup_delay_s:
                continue
            fd = self._try_lock(task)
            if fd is None:
                continue  # another process owns it
            try:
                shutil.rmtree(path, ignore_errors=True)
                cleaned.append(task)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        return cleaned

    def close(self) -> None:
        for task in list(self._locks):
            self.unlock(task)

    def _try_lock(self, task: int) -> int | None:
        fd = os.open(self.root / f"{task}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def _last_modified(path: Path) -> float:
    """The newest modification time of the folder or a file in it."""
    newest = path.stat().st_mtime
    for child in path.iterdir():
        try:
            newest = max(newest, child.stat().st_mtime)
        except FileNotFoundError:
            continue
    return newest
