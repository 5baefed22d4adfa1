"""The local model registry: round trips, checksums, promotion, rollback, gc, concurrency and the CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainers.registry import MODEL_FILE, CorruptModel, Registry, RegistryError, UnknownVersion, main

REPO = Path(__file__).resolve().parent.parent


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(50, 4, generator=g), "head.bias": torch.randn(3, generator=g),
            "steps": torch.tensor([seed], dtype=torch.int64)}


def _model_path(reg: Registry, version: str) -> Path:
    return reg.versions_dir / version / MODEL_FILE


def _flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    reg = Registry(tmp_path)
    state = _state(1)
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: saved as a contiguous copy
    meta = {"metrics": {"auc": 0.71}, "data_range": ["2026-01-01", "2026-01-30"], "created_ms": 123}
    version = reg.register(state, meta, "full", extra={"calibrator.json": b'{"a": 1}', "offsets/k.json": b"{}"})
    tensors, got = reg.load(version)
    assert set(tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(tensors[name], value)
    assert got["metrics"] == {"auc": 0.71} and got["created_ms"] == 123
    assert got["version"] == version and got["cadence"] == "full" and got["tensors"] == sorted(state)
    assert reg.extra(version, "calibrator.json") == b'{"a": 1}'
    assert reg.extra(version, "offsets/k.json") == b"{}"
    assert reg.list() == [got]
    assert [e["event"] for e in reg.events()] == ["register"]


def test_version_ids_increase_across_cadences(tmp_path):
    reg = Registry(tmp_path)
    versions = [reg.register(_state(i), {}, cadence) for i, cadence in enumerate(["full", "warm", "online", "warm"])]
    assert versions == ["v000001-full", "v000002-warm", "v000003-online", "v000004-warm"]
    assert [m["version"] for m in reg.list()] == versions
    assert reg.latest() == "v000004-warm"
    assert reg.latest("online") == "v000003-online"
    assert reg.latest("nope") is None


def test_bad_inputs_are_refused(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(TypeError, match="JSON serializable"):
        reg.register(_state(), {"when": object()}, "full")
    with pytest.raises(ValueError, match="cadence"):
        reg.register(_state(), {}, "../evil")
    with pytest.raises(ValueError, match="relative path"):
        reg.register(_state(), {}, "full", extra={"../x": b""})
    assert reg.list() == [] and not list(reg.versions_dir.glob(".tmp-*"))
    with pytest.raises(UnknownVersion):
        reg.load("v000001-full")
    with pytest.raises(UnknownVersion):
        reg.load("../../etc")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_model_is_detected_and_not_promoted(tmp_path, damage):
    reg = Registry(tmp_path)
    version = reg.register(_state(), {}, "full")
    path = _model_path(reg, version)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip":
        _flip_byte(path)
    else:
        path.unlink()
    with pytest.raises(CorruptModel) as err:
        reg.load(version)
    assert err.value.version == version
    with pytest.raises(CorruptModel):
        reg.promote(version)
    assert reg.promoted() is None


def test_broken_meta_is_listed_as_corrupt(tmp_path):
    reg = Registry(tmp_path)
    good = reg.register(_state(0), {}, "full")
    bad = reg.register(_state(1), {}, "warm")
    (reg.versions_dir / bad / "meta.json").write_text("{not json")
    listed = reg.list()
    assert listed[0]["version"] == good
    assert listed[1]["version"] == bad and "unreadable" in listed[1]["corrupt"]
    assert reg.latest() == good
    with pytest.raises(CorruptModel):
        reg.load(bad)


def test_damaged_extra_is_detected(tmp_path):
    reg = Registry(tmp_path)
    version = reg.register(_state(), {}, "full", extra={"cal.json": b"[1, 2, 3]"})
    (reg.versions_dir / version / "extra" / "cal.json").write_bytes(b"[1, 2, 4]")
    with pytest.raises(CorruptModel, match="cal.json"):
        reg.extra(version, "cal.json")
    with pytest.raises(CorruptModel):
        reg.promote(version)
    with pytest.raises(RegistryError, match="no extra file"):
        reg.extra(version, "other.json")


class _Bomb:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_renamed_to_safetensors_is_never_unpickled(tmp_path):
    reg = Registry(tmp_path / "reg")
    version = reg.register(_state(), {}, "full")
    marker = tmp_path / "unpickled"
    blob = pickle.dumps({"weight": _Bomb(str(marker))})
    _model_path(reg, version).write_bytes(blob)
    meta_path = reg.versions_dir / version / "meta.json"  # even with matching checksums it is refused
    meta = json.loads(meta_path.read_text())
    meta.update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptModel, match="safetensors"):
        reg.load(version)
    with pytest.raises(CorruptModel):
        reg.promote(version)
    assert not marker.exists()


def test_promotion_history_and_load_promoted_fallback(tmp_path):
    reg = Registry(tmp_path)
    v1 = reg.register(_state(1), {}, "full")
    v2 = reg.register(_state(2), {}, "warm")
    v3 = reg.register(_state(3), {}, "online")
    for v in (v1, v2, v3):
        reg.promote(v, reason=f"ship {v}")
    state = reg.promotion()
    assert state["version"] == v3 and state["previous"] == [v1, v2] and state["reason"] == f"ship {v3}"
    version, tensors, _ = reg.load_promoted()
    assert version == v3 and torch.equal(tensors["steps"], torch.tensor([3]))

    _flip_byte(_model_path(reg, v3))  # corrupted after promotion
    _model_path(reg, v2).write_bytes(b"")  # and so was the one before it
    version, tensors, _ = reg.load_promoted()
    assert version == v1 and torch.equal(tensors["steps"], torch.tensor([1]))
    assert reg.promoted() == v3  # PROMOTED is left alone

    _flip_byte(_model_path(reg, v1))
    with pytest.raises(RegistryError, match="no promoted"):
        reg.load_promoted()


def test_rollback_returns_to_previous_and_logs_reason(tmp_path):
    reg = Registry(tmp_path)
    v1 = reg.register(_state(1), {}, "full")
    v2 = reg.register(_state(2), {}, "warm")
    v3 = reg.register(_state(3), {}, "online")
    with pytest.raises(RegistryError, match="nothing is promoted"):
        reg.rollback("too early")
    for v in (v1, v2, v3):
        reg.promote(v)
    _flip_byte(_model_path(reg, v2))
    assert reg.rollback("calibration drift on v3") == v1  # v2 no longer verifies: skipped
    assert reg.promoted() == v1
    last = reg.events()[-1]
    assert last["event"] == "rollback" and last["version"] == v1 and last["from"] == v3
    assert last["reason"] == "calibration drift on v3"
    assert json.loads((tmp_path / "PROMOTED").read_text())["reason"] == "calibration drift on v3"
    with pytest.raises(RegistryError, match="cannot roll back"):
        reg.rollback("again")


def test_crashed_register_is_ignored_then_collected(tmp_path):
    reg = Registry(tmp_path)
    v1 = reg.register(_state(), {}, "full")
    crashed = reg.versions_dir / ".tmp-xyz"
    crashed.mkdir()
    (crashed / MODEL_FILE).write_bytes(b"partial")
    assert [m["version"] for m in reg.list()] == [v1]
    assert reg.latest() == v1
    assert reg.gc() == []  # a fresh temp folder may be a register in progress
    assert crashed.exists()
    old = time.time() - 2 * 3600
    for path in (crashed, crashed / MODEL_FILE):
        os.utime(path, (old, old))
    assert reg.gc() == [".tmp-xyz"]
    assert not crashed.exists()
    assert reg.register(_state(), {}, "warm") == "v000002-warm"


def test_gc_keeps_newest_and_promotion_history(tmp_path):
    reg = Registry(tmp_path)
    versions = [reg.register(_state(i), {}, "online") for i in range(6)]
    reg.promote(versions[0])
    reg.promote(versions[1])
    removed = reg.gc(keep=2)
    assert sorted(removed) == versions[2:4]
    assert [m["version"] for m in reg.list()] == [versions[0], versions[1], versions[4], versions[5]]
    assert reg.rollback("test") == versions[0]
    with pytest.raises(ValueError):
        reg.gc(keep=0)
    assert reg.register(_state(), {}, "full") == "v000007-full"


def _worker(root: str, cadence: str, count: int, start, results) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool carried over the fork
    start.wait()
    reg = Registry(Path(root))
    results.put([reg.register(_state(i), {"i": i}, cadence) for i in range(count)])


def test_concurrent_registers_get_distinct_versions(tmp_path):
    ctx = multiprocessing.get_context("fork")  # spawn would re-import torch in each child: seconds
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), cadence, 10, start, results))
             for cadence in ("online", "warm")]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    versions = got[0] + got[1]
    seqs = {int(v[1:7]) for v in versions}
    assert len(set(versions)) == 20 and seqs == set(range(1, 21))
    reg = Registry(tmp_path)
    listed = reg.list()
    assert sorted(m["version"] for m in listed) == sorted(versions)
    for meta in listed:
        tensors, _ = reg.load(meta["version"])
        assert torch.equal(tensors["steps"], torch.tensor([meta["i"]]))
    assert not list(reg.versions_dir.glob(".tmp-*"))


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers.registry", "--root", str(root), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_list_promote_rollback(tmp_path):
    """Each run imports torch (seconds), so only these run as real subprocesses."""
    reg = Registry(tmp_path)
    v1 = reg.register(_state(1), {"parent": None}, "full")
    v2 = reg.register(_state(2), {"parent": v1}, "warm")
    reg.promote(v1, "first")

    done = _cli(tmp_path, "promote", v2, "--reason", "better auc")
    assert done.returncode == 0 and v2 in done.stdout, done.stderr
    listing = _cli(tmp_path, "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].startswith("VERSION")
    assert v1 in lines[1] and "previous" in lines[1] and v2 in lines[2] and "promoted" in lines[2]
    back = _cli(tmp_path, "rollback", "--reason", "ctr dropped")
    assert back.returncode == 0 and v1 in back.stdout
    assert reg.promoted() == v1 and reg.events()[-1]["reason"] == "ctr dropped"
    bad = _cli(tmp_path, "promote", "v000099-full")
    assert bad.returncode == 1 and "v000099-full" in bad.stderr and not bad.stdout
    v3 = reg.register(_state(3), {"parent": v2}, "online")
    v4 = reg.register(_state(4), {"parent": v3}, "online")
    gc = _cli(tmp_path, "gc", "--keep", "1")  # what `make registry-gc` runs from the crontab
    assert gc.returncode == 0 and v3 in gc.stdout and v2 in gc.stdout, gc.stderr
    # The promoted v1 stays, and the newest; v2 left the history when it was rolled back from.
    assert [m["version"] for m in reg.list()] == [v1, v4]


def test_cli_show_and_verify(tmp_path, capsys):
    reg = Registry(tmp_path)
    v1 = reg.register(_state(1), {"parent": None}, "full")
    v2 = reg.register(_state(2), {"parent": v1}, "warm")
    root = ["--root", str(tmp_path)]
    assert main([*root, "show", v2]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == v1
    assert main([*root, "verify"]) == 0
    assert main([*root, "rollback", "--reason", "x"]) == 1
    assert "nothing is promoted" in capsys.readouterr().err
    _flip_byte(_model_path(reg, v2))
    assert main([*root, "promote", v2]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert main([*root, "verify"]) == 1
    out = capsys.readouterr().out
    assert f"{v1}  ok" in out and "CORRUPT" in out
    assert main([*root, "show", "nope"]) == 1
    assert main([*root, "list"]) == 0
    assert "CORRUPT" not in capsys.readouterr().out  # list reads meta only; verify reads the weights


def test_a_delta_stores_the_changed_rows_and_loads_whole(tmp_path):
    """Issue 19, item 6: an online version is stored as the rows it changed over its batch root plus the small
    tensors; loading rebuilds it exactly, and gc keeps the base while a delta needs it."""
    reg = Registry(tmp_path)
    table = torch.randn(20_000, 16)
    base = reg.register({"emb.weight": table, "dense.weight": torch.randn(8, 8)}, {}, "full")
    changed = table.clone()
    changed[[3, 777, 19_999]] += 1.0
    state = {"emb.weight": changed, "dense.weight": torch.randn(8, 8)}
    delta = reg.register(state, {}, "online", base=base)

    meta = reg.verify(delta)
    assert meta["delta_of"] == base and meta["size"] < reg.meta(base)["size"] / 100, (meta["size"],)
    loaded, _ = Registry(tmp_path).load(delta)
    assert torch.equal(loaded["emb.weight"], changed) and torch.equal(loaded["dense.weight"], state["dense.weight"])
    # A delta over a delta (the line's previous version): only the rows changed since it.
    again = changed.clone()
    again[5] -= 2.0
    second = reg.register({"emb.weight": again, "dense.weight": state["dense.weight"]}, {}, "online", base=delta)
    assert reg.meta(second)["delta_depth"] == 2 and reg.meta(second)["size"] < meta["size"]
    assert torch.equal(Registry(tmp_path).load(second)[0]["emb.weight"], again)  # cold: base, delta, delta

    for _ in range(3):
        reg.register({"x": torch.zeros(1)}, {}, "full")
    reg.gc(keep=4)  # base and the first delta are older than the newest four, but the kept second needs both
    assert {base, delta} <= set(reg.names())
    assert torch.equal(Registry(tmp_path).load(second)[0]["emb.weight"], again)
