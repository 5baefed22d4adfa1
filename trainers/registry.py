"""A model registry in a local folder: versioned safetensors weights, checksums, promotion and rollback.

Layout under the root (default ``settings.registry_dir``)::

    versions/<version>/model.safetensors   the tensors (safetensors is the only weight format ever loaded)
    versions/<version>/meta.json           metadata, with the sha256 and size of model.safetensors
    versions/<version>/extra/<name>        optional extra files (calibrators, Kafka offsets, ...)
    PROMOTED                               {"version", "previous": [oldest .. most recent], "reason", "at_ms"}
    events.jsonl                           append-only log of register / promote / rollback, with reasons
    lineage.jsonl                          the events lineage questions need, kept small: every promotion of
                                           a batch version and every rollback (online promotions are not in it)

Version ids are ``v<seq>-<cadence>`` (``v000001-full``, ``v000002-warm``, ``v000003-online``): one global
sequence across cadences, so ids sort in registration order. A version is written into a ``.tmp-<uuid>``
folder and renamed into place, so a crash leaves only a ``.tmp-*`` folder that :meth:`Registry.list` ignores
and :meth:`Registry.gc` removes. Sequence allocation and the rename run under an ``flock`` on ``<root>/.lock``,
so several processes (the online trainer, a warm start) may register at once.

Meta keys the registry sets, replacing the caller's: ``version``, ``cadence``, ``sha256``, ``size``,
``tensors`` (names), ``extra`` (name -> sha256 and size) and ``created_ms`` (kept when given). Keys callers
are expected to give (not enforced): ``data_range`` (the event-time span trained on), ``metrics`` (offline
evaluation), ``feature_service`` (the Feast service the model reads), ``parent`` (the version it was
warm-started from), ``model_config`` (what it takes to rebuild the module) and ``kafka_offsets`` (where the
online trainer stopped reading).

**Lineage.** Batch versions (``BATCH_CADENCES``: the full retrain and the daily warm start) form the spine:
each warm start's parent is the newest promoted batch version (:meth:`Registry.batch_head`). An online *line*
branches off one batch version (its ``line_root``); its versions carry ``line`` (``<root>~<k>``, named by
:meth:`Registry.new_line`) and their ``parent`` is the line's previous version. A version that was rolled
back, and everything descending from it, is *tainted* (:meth:`Registry.tainted`; a rolled-back online version
taints its whole line): :meth:`Registry.promote` refuses it and a rollback never lands on it. Lookups read
folder names (the cadence is in the id) and ``lineage.jsonl``, never every version's meta.

Command line: ``python -m trainers.registry [--root DIR] list | show V | verify [V] | promote V [--reason R]
| rollback --reason R``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

log = logging.getLogger(__name__)


def module_bytes(module: torch.nn.Module) -> bytes:
    """A module's weights as safetensors bytes: what an extra file of a version holds (its config goes in meta)."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
EXTRA_DIR = "extra"
PROMOTED_FILE = "PROMOTED"
EVENTS_FILE = "events.jsonl"
TMP_PREFIX = ".tmp-"
DELETE_PREFIX = ".del-"
LINEAGE_FILE = "lineage.jsonl"
VERSION_RE = re.compile(r"^v(\d{6,})-([A-Za-z0-9_]+)$")
BATCH_CADENCES = ("full", "warm")
CADENCE_RE = re.compile(r"^[A-Za-z0-9_]+$")


class RegistryError(Exception):
    """Something the registry cannot do (nothing promoted, nothing to roll back to, a bad argument)."""


class UnknownVersion(RegistryError):
    """No complete version of that id in the registry."""


class CorruptModel(RegistryError):
    """A version whose files are missing, unreadable or do not match their recorded checksum."""

    def __init__(self, version: str, reason: str) -> None:
        super().__init__(version, reason)
        self.version = version
        self.reason = reason

    def __str__(self) -> str:
        return f"version {self.version} is corrupt: {self.reason}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _seq(name: str) -> int | None:
    match = VERSION_RE.match(name)
    return int(match.group(1)) if match else None


DELTA_MIN_ROWS = 4096  # tables this large are stored as their changed rows in a delta
ROWS_SUFFIX, INDEX_SUFFIX = "::rows", "::index"


def _delta(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to store for a delta over ``base``: changed rows (and their indices) of large tables."""
    out = {}
    for name, t in tensors.items():
        b = base.get(name)
        large = t.dim() == 2 and t.shape[0] >= DELTA_MIN_ROWS
        if b is not None and large and t.shape == b.shape and t.dtype == b.dtype:
            rows = (t != b).any(dim=1).nonzero().squeeze(1)
            out[name + ROWS_SUFFIX] = t[rows].contiguous()
            out[name + INDEX_SUFFIX] = rows.to(torch.int64).contiguous()
        else:
            out[name] = t
    return out


def _apply_delta(stored: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in stored.items():
        if name.endswith(ROWS_SUFFIX):
            table = name[: -len(ROWS_SUFFIX)]
            full = base[table].clone()
            full[stored[table + INDEX_SUFFIX]] = t
            out[table] = full
        elif not name.endswith(INDEX_SUFFIX):
            out[name] = t
    return out


def _cadence(name: str) -> str | None:
    m = VERSION_RE.match(name)
    return m.group(2) if m else None


def _check_extra_name(name: str) -> None:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or any(p in ("..", ".") for p in parts) or name != "/".join(parts):
        raise ValueError(f"extra file name {name!r} must be a plain relative path (no '..', no leading '/')")


def _cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (copies, so that no two tensors share storage)."""
    out = {}
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict must map str to Tensor; got {name!r}: {type(value).__name__}")
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out


class Registry:
    """Model versions under ``root``; see the module docstring for the layout and the meta keys.

    ``history_limit`` caps how many previously promoted versions ``PROMOTED`` remembers (and :meth:`gc` keeps).
    """

    def __init__(self, root: Path | str, history_limit: int = 100) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.history_limit = history_limit
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None  # the last version loaded, whole

    # -- writing ------------------------------------------------------------------------------------------

    def register(self, state_dict: dict[str, torch.Tensor], meta: dict, cadence: str,
                 extra: dict[str, bytes] | None = None, base: str | None = None) -> str:
        """Write a new version atomically and return its id. With ``base``, the version is stored as a *delta*:
        the rows of large tables (``DELTA_MIN_ROWS`` rows or more) that differ from the base's, and every other
        tensor whole; ``meta["delta_depth"]`` counts the deltas down to a complete version. :meth:`load` rebuilds
        it over its base (itself perhaps a delta), and :meth:`gc` keeps every base a kept delta needs."""
        if not CADENCE_RE.match(cadence):
            raise ValueError(f"cadence {cadence!r} must be letters, digits or '_'")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise TypeError(f"meta is not JSON serializable: {err}") from err
        extra = extra or {}
        for name, data in extra.items():
            _check_extra_name(name)
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"extra file {name!r} must be bytes, not {type(data).__name__}")
        tensors = _cpu_tensors(state_dict)
        if base is not None:
            base_tensors, base_meta = self.load(base)
            tensors = _delta(tensors, base_tensors)
            meta = {**meta, "delta_of": base, "delta_depth": int(base_meta.get("delta_depth", 0)) + 1}

        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            blob = save_safetensors(tensors)
            _write_synced(tmp / MODEL_FILE, blob)
            extra_meta = {}
            for name, data in extra.items():
                path = tmp / EXTRA_DIR / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_synced(path, bytes(data))
                extra_meta[name] = {"sha256": _sha256(data), "size": len(data)}
            full_meta = {**meta, "cadence": cadence, "sha256": _sha256(blob), "size": len(blob),
                         "created_ms": meta.get("created_ms", _now_ms()), "tensors": sorted(tensors),
                         "extra": extra_meta}
            with self._locked():
                version = self._move_into_place(tmp, full_meta, cadence)
                self._append_event({"event": "register", "version": version, "cadence": cadence})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return version

    def _move_into_place(self, tmp: Path, meta: dict, cadence: str) -> str:
        """Give ``tmp`` the next free sequence number by renaming it (called under the lock)."""
        seq = self._max_seq() + 1
        for _ in range(1000):
            version = f"v{seq:06d}-{cadence}"
            meta["version"] = version
            _write_synced(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())
            _fsync_dir(tmp)
            target = self.versions_dir / version
            if not target.exists() and self._max_seq() < seq:
                try:
                    os.rename(tmp, target)
                except OSError as err:  # taken meanwhile (a registry shared without working flock)
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                else:
                    _fsync_dir(self.versions_dir)
                    return version
            seq = max(seq, self._max_seq()) + 1
        raise RegistryError("could not allocate a version id")

    def _max_seq(self) -> int:
        seqs = [_seq(p.name) for p in self.versions_dir.iterdir()] if self.versions_dir.exists() else []
        return max((s for s in seqs if s is not None), default=0)

    def promote(self, version: str, reason: str = "") -> None:
        """Make ``version`` the one served; refuses one that does not verify, and one that was rolled back or
        descends from a version that was. Re-promoting is a no-op."""
        self.verify(version)
        with self._locked():
            culprit = self.tainted(version)
            if culprit:
                raise RegistryError(f"{version} is not promotable: {culprit} was rolled back")
            state = self._read_promoted()
            if state and state["version"] == version:
                return
            previous = [*state["previous"], state["version"]] if state else []
            self._write_promoted(version, previous, reason)
            event = {"event": "promote", "version": version, "from": state and state["version"], "reason": reason}
            self._append_event(event)
            if _cadence(version) in BATCH_CADENCES:
                self._append_lineage(event)
        log.info("promoted %s (%s)", version, reason)

    def rollback(self, reason: str) -> str:
        """Re-promote the most recent previously promoted version that verifies and return it. The version rolled
        back from (and any skipped as corrupt) leaves the history, so a second rollback goes further back."""
        with self._locked():
            state = self._read_promoted()
            if not state:
                raise RegistryError("nothing is promoted: nothing to roll back")
            previous = list(state["previous"])
            rolled = {*self.rolled_back(), state["version"]}
            while previous:
                candidate = previous.pop()
                if candidate == state["version"] or self.tainted(candidate, rolled):
                    continue
                try:
                    self.verify(candidate)
                except RegistryError as err:
                    log.warning("rollback skips %s: %s", candidate, err)
                    continue
                self._write_promoted(candidate, previous, reason)
                event = {"event": "rollback", "version": candidate, "from": state["version"], "reason": reason}
                self._append_event(event)
                self._append_lineage(event)
                log.warning("rolled back from %s to %s (%s)", state["version"], candidate, reason)
                return candidate
        raise RegistryError(f"no previously promoted version verifies: cannot roll back from {state['version']}")

    def gc(self, keep: int = 20, tmp_grace_s: float = 3600.0) -> list[str]:
        """Remove abandoned temp folders (older than ``tmp_grace_s``, so a register in progress is spared) and
        every version but the newest ``keep`` and those in the promotion history. Returns what was removed."""
        if keep < 1:
            raise ValueError("keep must be at least 1 (the newest version holds the sequence number)")
        if not self.versions_dir.exists():
            return []
        removed = []
        now = time.time()
        with self._locked():
            state = self._read_promoted()
            protected = {state["version"], *state["previous"]} if state else set()
            versions = sorted((p for p in self.versions_dir.iterdir() if _seq(p.name) is not None),
                              key=lambda p: _seq(p.name))
            for name in [*(p.name for p in versions[-keep:]), *protected]:
                while name:  # a kept delta needs its bases, down to a complete version
                    try:
                        name = self._read_meta(name).get("delta_of")
                    except RegistryError:
                        break
                    if name:
                        protected.add(name)
            doomed = [p for p in versions[:-keep] if p.name not in protected]
            for path in doomed:
                trash = self.versions_dir / f"{DELETE_PREFIX}{uuid.uuid4().hex}"
                os.rename(path, trash)
                removed.append(path.name)
            for path in self.versions_dir.iterdir():
                stale = path.name.startswith(TMP_PREFIX) and now - _newest_mtime(path) > tmp_grace_s
                if stale or path.name.startswith(DELETE_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
                    if stale:
                        removed.append(path.name)
        return removed

    # -- reading ------------------------------------------------------------------------------------------

    def load(self, version: str) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and meta of ``version``, after checking the file's size and sha256 against meta.json."""
        meta = self._read_meta(version)
        path = self._dir(version) / MODEL_FILE
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise CorruptModel(version, f"cannot read {MODEL_FILE}: {err.strerror or err}") from err
        if len(blob) != meta["size"]:
            raise CorruptModel(version, f"{MODEL_FILE} is {len(blob)} bytes, meta.json says {meta['size']}")
        if _sha256(blob) != meta["sha256"]:
            raise CorruptModel(version, f"{MODEL_FILE} does not match its sha256 in meta.json")
        try:
            tensors = load_safetensors(blob)  # the verified bytes, so nothing can change after the check
        except Exception as err:  # any failure to parse means the file is not a model we wrote
            raise CorruptModel(version, f"{MODEL_FILE} is not valid safetensors: {err}") from err
        if "tensors" in meta and sorted(tensors) != meta["tensors"]:
            raise CorruptModel(version, "tensor names differ from meta.json")
        if meta.get("delta_of"):
            tensors = _apply_delta(tensors, self._composed(meta["delta_of"]))
        self._cache = (version, tensors)  # the next delta of a line applies over it
        return tensors, meta

    def _composed(self, version: str) -> dict[str, torch.Tensor]:
        """A delta's base, whole: the last version loaded by this registry object when it is that one (a scorer
        reloading the versions of one line applies one delta each time), else loaded (recursively)."""
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        return self.load(version)[0]

    def verify(self, version: str) -> dict:
        """Check a version's model and extra files; return its meta or raise :class:`CorruptModel`."""
        _, meta = self.load(version)
        for name in meta.get("extra", {}):
            self.extra(version, name)
        return meta

    def extra_holder(self, version: str, key: str) -> tuple[str, dict] | None:
        """The version whose extra files serve with ``version`` for meta key ``key`` (``"retrieval"``,
        ``"preranker"``), and its meta: ``version`` itself, or its line root for an online version without its own;
        None when neither has the key."""
        meta = self._read_meta(version)
        if key not in meta and meta.get("line_root"):
            version, meta = meta["line_root"], self._read_meta(meta["line_root"])
        return (version, meta) if meta.get(key) else None

    def extra(self, version: str, name: str) -> bytes:
        """One extra file of ``version``, checked against its recorded sha256."""
        _check_extra_name(name)
        meta = self._read_meta(version)
        recorded = meta.get("extra", {}).get(name)
        try:
            data = (self._dir(version) / EXTRA_DIR / name).read_bytes()
        except FileNotFoundError as err:
            if recorded:
                raise CorruptModel(version, f"extra file {name!r} is missing") from err
            raise RegistryError(f"version {version} has no extra file {name!r}") from err
        if recorded and (len(data) != recorded["size"] or _sha256(data) != recorded["sha256"]):
            raise CorruptModel(version, f"extra file {name!r} does not match its checksum")
        return data

    def list(self) -> list[dict]:
        """Metas of complete versions, oldest first; one whose meta.json is broken is ``{version, corrupt}``."""
        if not self.versions_dir.exists():
            return []
        names = sorted((p.name for p in self.versions_dir.iterdir() if _seq(p.name) is not None), key=_seq)
        out = []
        for name in names:
            try:
                out.append(self._read_meta(name))
            except CorruptModel as err:
                out.append({"version": name, "corrupt": err.reason})
            except UnknownVersion:  # removed by a concurrent gc
                continue
        return out

    def latest(self, cadence: str | None = None) -> str | None:
        """The newest version (of ``cadence`` if given) whose meta.json is readable, or None. Reads folder names
        and then only the metas it needs."""
        for name in reversed(self.names(cadence)):
            try:
                self._read_meta(name)
            except RegistryError:
                continue
            return name
        return None

    def names(self, cadence: str | None = None) -> list[str]:
        """Version ids (of ``cadence`` if given), oldest first, from folder names alone."""
        if not self.versions_dir.exists():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if _seq(p.name) is not None]
        return sorted((n for n in names if cadence is None or _cadence(n) == cadence), key=_seq)

    def meta(self, version: str) -> dict:
        """A version's meta.json (not the model file's checksum: see :meth:`verify`)."""
        return self._read_meta(version)

    # -- lineage ------------------------------------------------------------------------------------------

    def lineage_events(self) -> list[dict]:
        """Promotions of batch versions and every rollback, oldest first."""
        path = self.root / LINEAGE_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rolled_back(self) -> set[str]:
        """Every version a rollback moved away from."""
        return {e["from"] for e in self.lineage_events() if e["event"] == "rollback" and e.get("from")}

    def tainted(self, version: str, rolled: set[str] | None = None) -> str | None:
        """The rolled-back version that ``version`` is or descends from, or None. Walks the batch spine by
        ``parent``; an online line counts as one step (the circuit breaker judges a line as a whole, so a rollback
        of any of its versions taints all of them): the cost is the spine's length and the number of rollbacks,
        not the number of versions."""
        rolled = self.rolled_back() if rolled is None else rolled
        if not rolled:
            return None
        lines = {}
        for r in rolled:
            try:
                lines[r] = self._read_meta(r).get("line")
            except RegistryError:
                continue
        seen, current = set(), version
        while current and current not in seen:
            if current in rolled:
                return current
            seen.add(current)
            try:
                meta = self._read_meta(current)
            except UnknownVersion:
                return None  # removed by gc: the lineage ends here
            if meta.get("line"):
                for r, line in lines.items():
                    if line == meta["line"]:
                        return r
                current = meta.get("line_root")
            else:
                current = meta.get("parent")
        return None

    def new_line(self, root: str | None, start: dict) -> str:
        """Name a new online line branching off ``root`` (``<root>~<k>``, k counting that root's lines) and record
        where it starts (``start``: the input offsets, the event time it skips to) in lineage.jsonl."""
        with self._locked():
            k = 1 + sum(1 for e in self.lineage_events() if e["event"] == "line" and e.get("root") == root)
            line = f"{root or 'fresh'}~{k}"
            self._append_lineage({"event": "line", "line": line, "root": root, **start})
        return line

    def batch_head(self) -> str | None:
        """The newest batch version (``BATCH_CADENCES``) that was promoted and is not tainted: the model the
        online line and the next warm start continue from."""
        rolled = self.rolled_back()
        promoted = [e["version"] for e in self.lineage_events() if e["event"] == "promote"]
        for version in sorted(set(promoted), key=_seq, reverse=True):
            if (self.versions_dir / version).is_dir() and not self.tainted(version, rolled):
                return version
        return None

    def promoted(self) -> str | None:
        state = self._read_promoted()
        return state["version"] if state else None

    def promotion(self) -> dict | None:
        """The whole PROMOTED record (version, previous, reason, at_ms), or None."""
        return self._read_promoted()

    def load_promoted(self) -> tuple[str, dict[str, torch.Tensor], dict]:
        """Load the promoted version; if it is corrupt, the most recent previous one that loads keeps serving
        (PROMOTED is left as it is: a rollback is an operator's decision)."""
        state = self._read_promoted()
        if not state:
            raise RegistryError(f"nothing is promoted in {self.root}")
        candidates = [state["version"], *reversed(state["previous"])]
        for version in dict.fromkeys(candidates):
            try:
                tensors, meta = self.load(version)
            except RegistryError as err:
                log.warning("cannot serve %s: %s; trying the previous promoted version", version, err)
                continue
            if version != state["version"]:
                log.warning("serving %s instead of the promoted %s", version, state["version"])
            return version, tensors, meta
        raise RegistryError(f"no promoted or previously promoted version loads in {self.root}")

    def events(self) -> list[dict]:
        """The event log, oldest first."""
        path = self.root / EVENTS_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- internals ----------------------------------------------------------------------------------------

    def _dir(self, version: str) -> Path:
        if _seq(version) is None or not (self.versions_dir / version).is_dir():
            raise UnknownVersion(f"no version {version!r} in {self.root}")
        return self.versions_dir / version

    def _read_meta(self, version: str) -> dict:
        path = self._dir(version) / META_FILE
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CorruptModel(version, f"{META_FILE} is missing") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptModel(version, f"{META_FILE} is unreadable: {err}") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not isinstance(
                meta.get("size"), int):
            raise CorruptModel(version, f"{META_FILE} lacks sha256 or size")
        if meta.get("version") != version:
            raise CorruptModel(version, f"{META_FILE} names version {meta.get('version')!r}")
        return meta

    def _read_promoted(self) -> dict | None:
        path = self.root / PROMOTED_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RegistryError(f"{path} is unreadable: {err}") from err
        if not isinstance(state, dict) or not isinstance(state.get("version"), str):
            raise RegistryError(f"{path} has no version")
        state.setdefault("previous", [])
        return state

    def _write_promoted(self, version: str, previous: list[str], reason: str) -> None:
        """Replace PROMOTED atomically (called under the lock)."""
        previous = [v for v in previous if v != version][-self.history_limit:] if self.history_limit else []
        state = {"version": version, "previous": previous, "reason": reason, "at_ms": _now_ms()}
        tmp = self.root / f".{PROMOTED_FILE}{TMP_PREFIX}{uuid.uuid4().hex}"
        _write_synced(tmp, json.dumps(state, indent=2).encode())
        os.replace(tmp, self.root / PROMOTED_FILE)
        _fsync_dir(self.root)

    def _append_lineage(self, event: dict) -> None:
        """Append one line to lineage.jsonl (called under the lock)."""
        with open(self.root / LINEAGE_FILE, "a") as f:
            f.write(json.dumps({"at_ms": _now_ms(), **event}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _append_event(self, event: dict) -> None:
        """Append one line to events.jsonl (called under the lock)."""
        line = json.dumps({"at_ms": _now_ms(), **event, "pid": os.getpid()}) + "\n"
        with open(self.root / EVENTS_FILE, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the registry, across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of a folder or anything in it (now, if it vanished meanwhile)."""
    try:
        return max([path.stat().st_mtime, *(sub.stat().st_mtime for sub in path.rglob("*"))])
    except FileNotFoundError:
        return time.time()


# -- command line ---------------------------------------------------------------------------------------------


def _fmt_ms(ms: int | None) -> str:
    if not isinstance(ms, int):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    state = reg.promotion() or {"version": None, "previous": []}
    rows = [["VERSION", "CADENCE", "CREATED (UTC)", "BYTES", "PARENT", "LINE", "STATUS"]]
    rolled = reg.rolled_back()
    for meta in reg.list():
        version = meta["version"]
        if "corrupt" in meta:
            status = f"CORRUPT: {meta['corrupt']}"
        else:
            status = "promoted" if version == state["version"] else ("previous" if version in state["previous"]
                                                                       else "")
            status = f"{status} rolled back".strip() if version in rolled else status
        delta = f" (delta of {meta['delta_of']})" if meta.get("delta_of") else ""
        rows.append([version, str(meta.get("cadence", "-")), _fmt_ms(meta.get("created_ms")),
                     f"{meta.get('size', '-')}{delta}", str(meta.get("parent") or "-"), str(meta.get("line") or "-"),
                     status])
    print(_table(rows) if len(rows) > 1 else f"no versions in {reg.root}")
    print(f"batch head: {reg.batch_head() or '-'}")
    return 0


def _cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    meta = reg.verify(args.version)
    print(json.dumps({**meta, "promoted": reg.promoted() == args.version}, indent=2, sort_keys=True))
    return 0


def _cmd_verify(reg: Registry, args: argparse.Namespace) -> int:
    versions = [args.version] if args.version else [m["version"] for m in reg.list()]
    rows, failed = [["VERSION", "RESULT"]], 0
    for version in versions:
        try:
            reg.verify(version)
            rows.append([version, "ok"])
        except CorruptModel as err:
            rows.append([version, f"CORRUPT: {err.reason}"])
            failed += 1
    print(_table(rows) if versions else f"no versions in {reg.root}")
    return 1 if failed else 0


def _cmd_promote(reg: Registry, args: argparse.Namespace) -> int:
    before = reg.promoted()
    reg.promote(args.version, args.reason)
    print(f"promoted {args.version}" + (f" (was {before})" if before and before != args.version else ""))
    return 0


def _cmd_gc(reg: Registry, args: argparse.Namespace) -> int:
    removed = reg.gc(keep=args.keep)
    print(f"gc: removed {len(removed)} version(s) or abandoned folder(s)" + (f": {', '.join(removed)}" if removed
                                                                          else ""))
    return 0


def _cmd_rollback(reg: Registry, args: argparse.Namespace) -> int:
    before = reg.promoted()
    print(f"rolled back from {before} to {reg.rollback(args.reason)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="registry folder (default: settings.registry_dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="versions, oldest first").set_defaults(run=_cmd_list)
    show = sub.add_parser("show", help="a version's meta as JSON (after verifying it)")
    show.add_argument("version")
    show.set_defaults(run=_cmd_show)
    verify = sub.add_parser("verify", help="check checksums of one version, or all")
    verify.add_argument("version", nargs="?")
    verify.set_defaults(run=_cmd_verify)
    promote = sub.add_parser("promote", help="serve a version")
    promote.add_argument("version")
    promote.add_argument("--reason", default="")
    promote.set_defaults(run=_cmd_promote)
    rollback = sub.add_parser("rollback", help="serve the previous promoted version again")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(run=_cmd_rollback)
    gc = sub.add_parser("gc", help="remove all but the newest KEEP versions and the promotion history")
    gc.add_argument("--keep", type=int, default=20)
    gc.set_defaults(run=_cmd_gc)
    args = parser.parse_args(argv)
    if args.root is None:
        from infra.settings import get_settings

        args.root = get_settings().registry_dir
    try:
        return args.run(Registry(args.root), args)
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
