"""The run store: atomic files, stage keys and shards, the lock, and resuming after ``kill -9``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_run

from pgraft_cli.errors import RunLockedError, RunStoreError
from pgraft_cli.io.runstore import (MANIFEST, Dist, RunStore, atomic_path, atomic_write_bytes, atomic_write_text,
                                 content_key, load_training_state, save_training_state, sha256_file, stage_key,
                                 state_digest, tensor_digest)

def cli(*args: str) -> subprocess.CompletedProcess:
    """In this process, one torch thread: on a small, busy CPU two threads per process fight over the cores
    and sampling gets ten times slower; every run of a comparison (the killed fork too) gets the same."""
    return cli_run(*args)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------
# atomic files


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"old")
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"new contents")
        assert target.read_bytes() == b"old"  # readers still see the old file until the rename
    assert target.read_bytes() == b"new contents"
    assert listing(tmp_path) == ["sub", "sub/f.bin"]


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(ValueError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half a new fi")
            raise ValueError("boom")
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["f.txt"]


def test_atomic_path_on_error_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_atomic_file_gets_the_usual_permissions(tmp_path):
    atomic_write_text(tmp_path / "a", "x")
    (tmp_path / "b").write_text("x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777


def test_a_file_its_writer_replaces_in_the_temporary_path_gets_the_usual_permissions_too(tmp_path):
    """safetensors' save_file replaces the file it writes with one of mode 0600: every checkpoint pgraft wrote
    (tuned.safetensors, corrected.safetensors) was unreadable to the user's group whatever the umask."""
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": torch.zeros(1)}, str(tmp))
    (tmp_path / "b").write_text("x")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777


# ------------------------------------------------------------------------------------------------
# stages and shards


def fill(stage, indices, payload=b"shard"):
    for k in indices:
        with stage.write_shard(k) as tmp:
            tmp.write_bytes(payload + bytes([k]))


def states(store: RunStore) -> dict[str, tuple]:
    return {s.name: (s.state, s.shards_done, s.shards_total) for s in store.status()}


def test_stage_key_depends_on_config_and_inputs_only():
    a = stage_key("sample", {"num": 4, "seed": 1}, {"model": "m"})
    assert a == stage_key("sample", {"seed": 1, "num": 4}, {"model": "m"})  # order does not matter
    assert len(a) == 64
    assert a != stage_key("sample", {"num": 4, "seed": 2}, {"model": "m"})
    assert a != stage_key("sample", {"num": 4, "seed": 1}, {"model": "other"})
    assert a != stage_key("score", {"num": 4, "seed": 1}, {"model": "m"})


def test_tensor_digest_is_the_values_dtype_and_shape():
    import torch

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_digest(t) == tensor_digest(t.clone()) == tensor_digest(t.T.contiguous().T)  # layout-free
    for other in (t.double(), t.reshape(3, 2), t + torch.tensor([0, 0, 1e-6]), t.bfloat16()):
        assert tensor_digest(other) != tensor_digest(t)
    assert len(tensor_digest(torch.zeros(0))) == 64 and tensor_digest(torch.tensor(1.0)) != tensor_digest(torch.tensor(2.0))


def test_state_digest_and_content_key_see_every_weight_and_field():
    import dataclasses

    import torch

    a, b = torch.zeros(3), torch.ones(2)
    assert state_digest({"a": a, "b": b}) == state_digest({"b": b, "a": a})  # name order, not dict order
    assert state_digest({"a": a, "b": b}) != state_digest({"a": a, "c": b})

    @dataclasses.dataclass
    class Composed:
        steps: int
        net: torch.nn.Module
        table: torch.Tensor

    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    key = content_key(Composed(2, net, a))
    assert json.dumps(key) and key == content_key(Composed(2, net, a.clone()))
    assert key != content_key(Composed(3, net, a)) and key != content_key(Composed(2, net, a + 1))
    with torch.no_grad():
        net.bias.add_(1e-3)
    assert key != content_key(Composed(2, net, a))


def test_a_stage_reading_another_stages_outputs_is_redone_when_they_are_remade(tmp_path):
    with RunStore(tmp_path) as store:
        assert store.outputs_digest("up") is None  # not run: nothing to key on
        up = store.open_stage("up", {"seed": 1}, {}, num_shards=1)
        fill(up, [0])
        up.finish([up.shard_path(0)])
        first = store.outputs_digest("up")
        down = store.open_stage("down", {}, {"up": first}, num_shards=1)
        fill(down, [0])
        down.finish([down.shard_path(0)])
        up = store.open_stage("up", {"seed": 2}, {}, num_shards=1)  # redone with other outputs
        with up.write_shard(0) as tmp:
            tmp.write_bytes(b"other samples")
        up.finish([up.shard_path(0)])
        assert store.outputs_digest("up") != first
        assert not store.open_stage("down", {}, {"up": store.outputs_digest("up")}, num_shards=1).done


def test_same_key_resumes_finished_shards(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {"a": 1}, {"m": "x"}, num_shards=3)
        fill(stage, [0, 1])
        again = store.open_stage("s", {"a": 1}, {"m": "x"}, num_shards=3)
        assert again.key == stage.key
        assert again.done_shards() == [0, 1]
        assert not again.shard_done(2) and not again.done


def test_changed_config_clears_the_stage(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {"a": 1}, {"m": "x"}, num_shards=2)
        fill(stage, [0, 1])
        stage.finish([stage.shard_path(0), stage.shard_path(1)])
        assert store.open_stage("s", {"a": 1}, {"m": "x"}, num_shards=2).done
        other = store.open_stage("s", {"a": 2}, {"m": "x"}, num_shards=2)
        assert other.key != stage.key
        assert other.done_shards() == [] and not other.done
        assert list(other.dir.glob("shard-*")) == []
        assert states(store) == {"s": ("pending", 0, 2)}
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        assert manifest["stages"]["s"]["key"] == other.key and manifest["stages"]["s"]["config"] == {"a": 2}
        # changed inputs clear it too
        fill(other, [0])
        third = store.open_stage("s", {"a": 2}, {"m": "y"}, num_shards=2)
        assert third.done_shards() == []


def test_shards_the_manifest_does_not_know_are_not_reused(tmp_path):
    with RunStore(tmp_path) as store:
        fill(store.open_stage("s", {"a": 1}, {}, num_shards=2), [0, 1])
        (tmp_path / MANIFEST).unlink()  # e.g. a user deleted it: the shards' key is unknown
        assert store.open_stage("s", {"a": 2}, {}, num_shards=2).done_shards() == []


def test_stages_are_independent(tmp_path):
    with RunStore(tmp_path) as store:
        a = store.open_stage("a", {}, {}, num_shards=1)
        fill(a, [0])
        a.finish([a.shard_path(0)])
        store.open_stage("b", {"x": 1}, {}, num_shards=1)
        store.open_stage("b", {"x": 2}, {}, num_shards=1)  # changing b leaves a alone
        assert states(store) == {"a": ("done", 1, 1), "b": ("pending", 0, 1)}


def test_status_reports_every_state(tmp_path):
    with RunStore(tmp_path) as store:
        pending = store.open_stage("pending", {}, {}, num_shards=2)
        partial = store.open_stage("partial", {}, {}, num_shards=3)
        fill(partial, [0, 2])
        done = store.open_stage("done", {}, {}, num_shards=2)
        fill(done, [0, 1])
        extra = store.write_json("done/settings.json", {"k": 1})
        done.finish([done.shard_path(0), done.shard_path(1), extra], extra={"note": "x"})
        stale = store.open_stage("stale", {}, {}, num_shards=1)
        fill(stale, [0])
        settings = store.write_json("stale/settings.json", {"k": 1})
        stale.finish([stale.shard_path(0), settings])
        assert pending.done_shards() == [] and done.done and stale.done
        time.sleep(0.01)
        settings.write_text('{"k": 2}')  # an output modified after the stage finished
        assert not stale.done
    got = {s.name: s for s in RunStore(tmp_path, is_main=False).status()}
    assert {k: (v.state, v.shards_done, v.shards_total) for k, v in got.items()} == {
        "pending": ("pending", 0, 2), "partial": ("partial", 2, 3), "done": ("done", 2, 2),
        "stale": ("stale", 1, 1)}
    assert got["done"].key == done.key
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    entry = manifest["stages"]["done"]
    assert entry["status"] == "done" and entry["note"] == "x" and entry["seconds"] >= 0
    assert entry["outputs"] == {"done/shard-00000.safetensors": sha256_file(done.shard_path(0)),
                                "done/shard-00001.safetensors": sha256_file(done.shard_path(1)),
                                "done/settings.json": sha256_file(extra)}


def test_a_deleted_output_makes_a_stage_stale(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=2)
        fill(stage, [0, 1])
        stage.finish([stage.shard_path(0), stage.shard_path(1)])
        stage.shard_path(1).unlink()
        assert states(store) == {"s": ("stale", 1, 2)}


def test_a_stale_stage_is_reopened_as_partial_and_redoes_only_broken_shards(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=3)
        fill(stage, [0, 1, 2])
        stage.finish([stage.shard_path(k) for k in range(3)])
        stage.shard_path(1).write_bytes(b"tampered")
        reopened = store.open_stage("s", {}, {}, num_shards=3)
        assert not reopened.done
        assert reopened.done_shards() == [0, 2]
        assert states(store) == {"s": ("partial", 2, 3)}
        fill(reopened, [1])
        reopened.finish([reopened.shard_path(k) for k in range(3)])
        assert reopened.done and states(store) == {"s": ("done", 3, 3)}


def test_corrupted_shard_is_not_done(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=3)
        fill(stage, [0, 1, 2], payload=b"x" * 1000)
        assert stage.done_shards() == [0, 1, 2]
        data = bytearray(stage.shard_path(1).read_bytes())
        data[500] ^= 0xFF  # one flipped byte, same size
        stage.shard_path(1).write_bytes(bytes(data))
        stage.shard_path(2).write_bytes(stage.shard_path(2).read_bytes()[:-10])  # truncated
        assert stage.done_shards() == [0]
        assert not stage.shard_done(1) and not stage.shard_done(2)
        assert states(store) == {"s": ("partial", 1, 3)}
        fill(stage, [1, 2], payload=b"x" * 1000)  # rewriting a shard makes it whole again
        assert stage.done_shards() == [0, 1, 2]


def test_only_files_without_a_checksum_are_fsynced(tmp_path, monkeypatch):
    """Shards and their checksums skip fsync (a shard a power loss damaged fails ``shard_done`` and is
    redone, as above); the manifest and plain atomic files are fsynced, file and directory."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=2)
        synced.clear()
        fill(stage, [0, 1])
        assert synced == [] and stage.done_shards() == [0, 1]
        stage.finish([stage.shard_path(0), stage.shard_path(1)])
        assert len(synced) == 2  # the manifest and its directory
        atomic_write_text(tmp_path / "a.txt", "a")
        assert len(synced) == 4 and stage.done


def test_versions_are_read_once_per_process(monkeypatch):
    """The installed versions in each provenance entry are read once (a metadata file per package)."""
    import importlib.metadata

    from pgraft_cli.io import runstore

    first = runstore.versions()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: pytest.fail(f"{name} read again"))
    again = runstore.versions()
    again["torch"] = "changed"  # a caller's copy: the next caller still sees the installed versions
    assert runstore.versions() == first and first["torch"] and first["python"]


def test_shard_without_checksum_or_with_a_bad_one_is_not_done(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=3)
        fill(stage, [0, 1, 2])
        (stage.dir / "shard-00000.sha256").unlink()  # killed between the shard and its checksum
        (stage.dir / "shard-00001.sha256").write_bytes(b"\xff\xfe garbage")
        assert stage.done_shards() == [2]


def test_temp_files_of_a_killed_writer_are_cleared(tmp_path):
    with RunStore(tmp_path) as store:
        stage = store.open_stage("s", {}, {}, num_shards=2)
        fill(stage, [0])
        leftover = stage.dir / ".shard-00001.safetensors.k1ll3d.tmp"
        leftover.write_bytes(b"half")
        again = store.open_stage("s", {}, {}, num_shards=2)
        assert not leftover.exists()
        assert again.done_shards() == [0]


def test_non_main_process_does_not_clear_or_write(tmp_path):
    with RunStore(tmp_path) as store:
        fill(store.open_stage("s", {"a": 1}, {}, num_shards=2), [0])
    before = (tmp_path / MANIFEST).read_bytes()
    worker = RunStore(tmp_path, is_main=False)
    with worker:
        stage = worker.open_stage("s", {"a": 2}, {}, num_shards=2)
        assert (tmp_path / "s" / "shard-00000.safetensors").exists()
        assert not stage.done
    assert (tmp_path / MANIFEST).read_bytes() == before


def test_damaged_manifest_is_a_clear_error(tmp_path):
    store = RunStore(tmp_path)
    for text in ("{not json", "[]", '{"stages": 3}', "\xff"):
        (tmp_path / MANIFEST).write_text(text, errors="surrogateescape")
        with pytest.raises(RunStoreError, match="damaged"):
            store.read_manifest()


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunStoreError, match="not a directory"):
        RunStore(path).__enter__()


# ------------------------------------------------------------------------------------------------
# the lock


HOLD = textwrap.dedent("""
    import sys, time
    from pgraft_cli.io.runstore import RunStore
    store = RunStore(sys.argv[1]).__enter__()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another process holds (killed with SIGKILL at the end)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        proc.kill()
        proc.wait()


def test_second_store_is_refused_while_another_process_holds_the_lock(held):
    run_dir, proc = held
    with pytest.raises(RunLockedError) as info:
        RunStore(run_dir).__enter__()
    message = str(info.value)
    assert str(run_dir) in message and f"pid {proc.pid}" in message and "--run-dir" in message
    # a worker process of the same run (is_main=False) does not take the lock
    with RunStore(run_dir, is_main=False):
        pass


def test_lock_is_released_when_its_holder_is_killed(held):
    run_dir, proc = held
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunStore(run_dir) as store:  # no stale lock after kill -9
        assert (run_dir / ".lock").read_text() == f"pid {os.getpid()}"
        assert store.root == run_dir


def test_lock_is_released_on_exit_and_taken_within_one_process(tmp_path):
    first = RunStore(tmp_path).__enter__()
    with pytest.raises(RunLockedError):
        RunStore(tmp_path).__enter__()
    first.__exit__(None, None, None)
    with RunStore(tmp_path):
        pass


def test_cli_refuses_a_run_dir_in_use(held, tmp_path):
    run_dir, _ = held
    result = cli("sample", "digits", "--num", "16", "--steps", "2", "--batch-size", "16",
                 "--run-dir", run_dir, "--out", tmp_path / "out", "--quiet")
    line = one_error_line(result)
    assert str(run_dir) in line and "in use" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# kill -9 and resume, end to end

NUM, BATCH = 192, 16
SHARDS = NUM // BATCH


def sample_args(run_dir: Path, out: Path) -> list[str]:
    return ["sample", "digits", "--num", str(NUM), "--steps", "8", "--batch-size", str(BATCH), "--seed", "3",
            "--run-dir", str(run_dir), "--out", str(out), "--quiet"]


def status_json(run_dir: Path) -> dict:
    result = cli("status", run_dir, "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["stages"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the command: (run_dir, out, summary)."""
    root = tmp_path_factory.mktemp("reference")
    result = cli(*sample_args(root / "run", root / "out"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["generated_now"] == NUM and summary["num"] == NUM
    return root / "run", root / "out", summary


def _sample_in_a_fork(run_dir: Path, out: Path) -> None:
    (out.parent / "stderr.txt").write_text(cli(*sample_args(run_dir, out)).stderr)


def test_kill_9_then_resume_gives_the_same_bytes(tmp_path, reference):
    import multiprocessing

    _, ref_out, _ = reference
    run_dir, out = tmp_path / "run", tmp_path / "out"
    # a process of its own to kill, forked from this one: without a new interpreter's start-up and imports
    proc = multiprocessing.get_context("fork").Process(target=_sample_in_a_fork, args=(run_dir, out))
    proc.start()
    deadline = time.monotonic() + 240
    try:
        while len(list((run_dir / "sample").glob("shard-*.sha256"))) < 2:
            assert proc.is_alive(), f"sampling ended before it could be killed: {(tmp_path / 'stderr.txt').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no 2 shards within 240 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL

    stage = status_json(run_dir)["sample"]
    assert stage["state"] == "partial", stage
    assert 2 <= stage["shards_done"] < SHARDS and stage["shards_total"] == SHARDS

    resumed = cli(*sample_args(run_dir, out), "--json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["generated_now"] == NUM - BATCH * stage["shards_done"]  # only the missing shards
    assert summary["num"] == NUM

    assert status_json(run_dir)["sample"] | {"key": None} == {
        "name": "sample", "state": "done", "shards_done": SHARDS, "shards_total": SHARDS, "key": None}
    assert not list((run_dir / "sample").glob(".*.tmp"))
    got, want = pngs(out), pngs(ref_out)
    assert len(want) == NUM and list(got) == list(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


@pytest.mark.slow  # the whole command end to end
def test_rerun_of_a_finished_command_generates_nothing(tmp_path, reference):
    ref_run, ref_out, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_run, run_dir)
    before = {p: p.read_bytes() for p in sorted((run_dir / "sample").iterdir())}
    manifest = json.loads((run_dir / MANIFEST).read_text())
    out = tmp_path / "out"
    result = cli(*sample_args(run_dir, out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["generated_now"] == 0 and summary["num"] == NUM
    assert pngs(out) == pngs(ref_out)
    assert {p: p.read_bytes() for p in sorted((run_dir / "sample").iterdir())} == before
    after = json.loads((run_dir / MANIFEST).read_text())
    assert after["stages"]["sample"]["finished"] == manifest["stages"]["sample"]["finished"]

    # an output modified after finishing: status says stale and a re-run redoes only that shard
    shard = run_dir / "sample" / "shard-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert status_json(run_dir)["sample"]["state"] == "stale"
    redo = cli(*sample_args(run_dir, tmp_path / "out2"), "--json")
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert json.loads(redo.stdout)["generated_now"] == BATCH
    assert pngs(tmp_path / "out2") == pngs(ref_out)
    assert status_json(run_dir)["sample"]["state"] == "done"


def test_changed_settings_redo_the_stage(tmp_path, reference):
    ref_run, _, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_run, run_dir)
    old_key = status_json(run_dir)["sample"]["key"]
    result = cli("sample", "digits", "--num", "16", "--steps", "2", "--batch-size", "16", "--seed", "3",
                 "--run-dir", run_dir, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["generated_now"] == 16
    stage = status_json(run_dir)["sample"]
    assert stage["key"] != old_key and (stage["state"], stage["shards_done"], stage["shards_total"]) == ("done", 1, 1)
    assert sorted(p.name for p in (run_dir / "sample").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00000.sha256"]


# ------------------------------------------------------------------------------------------------
# pgraft status


def test_status_on_a_folder_that_is_not_a_run_dir(tmp_path):
    line = one_error_line(cli("status", tmp_path))
    assert str(tmp_path) in line and "not a pgraft run directory" in line
    line = one_error_line(cli("status", tmp_path / "missing"))
    assert "missing" in line


def test_status_on_a_damaged_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{oops")
    line = one_error_line(cli("status", tmp_path))
    assert MANIFEST in line and "damaged" in line


def test_status_human_table(tmp_path):
    with RunStore(tmp_path) as store:
        fill(store.open_stage("sample", {}, {}, num_shards=4), [0])
    result = cli("status", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sample" in result.stdout and "partial" in result.stdout and "1/4" in result.stdout


def test_run_sharded_splits_shards_over_processes_and_resumes_only_missing_ones(tmp_path):
    import torch

    calls: list[tuple[int, int]] = []

    def work(rank):
        def shard(k):
            calls.append((rank, k))
            return {"index": torch.arange(3 * k, 3 * k + 3), "value": torch.full((3,), float(k))}
        return shard

    config, inputs = {"n": 5}, {"data": "x"}
    with RunStore(tmp_path / "run") as store:
        store.open_stage("demo", config, inputs, 5)  # the main process opens the stage before the others start
        other = RunStore(tmp_path / "run", is_main=False)  # process 1 of 2: writes its shards, finishes nothing
        assert not other.run_sharded("demo", config, inputs, 5, work(1), Dist(1, 2)).done
        assert calls == [(1, 1), (1, 3)]
        (store.root / "demo" / "shard-00001.safetensors").unlink()  # process 1's shard 1 got lost
        with pytest.raises(RunStoreError, match=r"shards \[1\] of the demo stage are missing"):
            store.run_sharded("demo", config, inputs, 5, work(0), Dist(0, 2))
        assert calls[2:] == [(0, 0), (0, 2), (0, 4)]
        calls.clear()
        done = []
        stage = store.run_sharded("demo", config, inputs, 5, work(0), todo=done.extend,
                                  outputs=lambda s: [store.write_json("demo/extra.json", {"ok": True})])
        assert stage.done and done == [1] and calls == [(0, 1)]  # only the lost shard is redone
        assert "demo/extra.json" in store.read_manifest()["stages"]["demo"]["outputs"]
        calls.clear()
        assert store.run_sharded("demo", config, inputs, 5, work(0)).done and calls == []
    found = RunStore(tmp_path / "run", is_main=False).stage("demo").tensors("index", "value")
    assert found["index"].tolist() == list(range(15)) and found["value"].tolist() == [k for k in range(5) for _ in range(3)]


def test_run_sharded_writes_what_map_work_yields_in_order_and_closes_it_when_a_shard_fails(tmp_path):
    """``map_work`` may compute shards ahead (several at once): each is written in order as it is yielded,
    stamped with its own work's seconds; a failing shard leaves the ones before it written and the
    mapper closed (its threads' clean-up runs), and a re-run redoes only what is missing."""
    from safetensors import safe_open

    events: list[str] = []

    def work(k):
        if k == 2 and "fail" in events:
            raise ValueError("shard 2")
        return {"value": torch.full((2,), float(k))}

    def ahead(fn, ks):  # computes every shard before yielding the first, as a pool of threads may
        try:
            done = [fn(k) for k in ks]
            events.append("computed")
            yield from done
        finally:
            events.append("closed")

    with RunStore(tmp_path / "run") as store:
        stage = store.run_sharded("demo", {}, {}, 3, work, stamp=True, map_work=ahead)
        assert stage.done and events == ["computed", "closed"]
        for k in range(3):
            with safe_open(str(stage.shard_path(k)), "pt") as f:
                assert f.get_tensor("value").tolist() == [k, k] and float(f.metadata()["pgraft.seconds"]) >= 0

        events.clear()
        (store.root / "demo" / "shard-00001.safetensors").unlink()
        (store.root / "demo" / "shard-00002.safetensors").unlink()
        unwritable = lambda k: {"value": torch.zeros(4, 4).t()} if k == 2 else work(k)  # noqa: E731 - not contiguous
        with pytest.raises(ValueError, match="contiguous") as failed:  # the write fails while the mapper waits
            store.run_sharded("demo", {}, {}, 3, unwritable, map_work=ahead)
        assert events == ["computed", "closed"] and failed.value is not None  # closed, not left to the traceback's end
        assert stage.shard_done(1) and not stage.shard_done(2)
        events[:] = ["fail"]
        with pytest.raises(ValueError, match="shard 2"):  # the work itself fails
            store.run_sharded("demo", {}, {}, 3, work)
        assert not stage.shard_done(2)
        events.clear()
        assert store.run_sharded("demo", {}, {}, 3, work, map_work=ahead).done and events == ["computed", "closed"]


# ------------------------------------------------------------------------------------------------
# training state: the optimizer state as torch's own load_state_dict places it


RESUME_DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA"))]


@pytest.mark.parametrize("device", RESUME_DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_loaded_optimizer_state_sits_where_torchs_load_state_dict_puts_it(tmp_path, device, fused):
    """A fused (or capturable) AdamW reads ``step`` from the parameter's device as float32, a plain one
    from the CPU; the moments follow the parameter. On the CPU both are the CPU, so the meta device
    stands in for an accelerator here (CUDA runs the real case where it exists)."""
    src = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(src, lr=1e-2, fused=fused)  # torch's loader takes ``fused`` from the saved groups
    for _ in range(2):
        sum((p * p).sum() for p in src).backward()
        opt.step()
    save_training_state(tmp_path / "state.safetensors", {}, {}, src, opt, 2, [1.0, 0.5])

    def fresh() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        params = [torch.nn.Parameter(p.detach().to(device)) for p in src]
        return params, torch.optim.AdamW(params, lr=1e-2, fused=fused)

    ours, ours_opt = fresh()
    step, losses, _, _ = load_training_state(tmp_path / "state.safetensors", ours, ours_opt)
    theirs, theirs_opt = fresh()
    theirs_opt.load_state_dict(opt.state_dict())
    assert (step, losses) == (2, [1.0, 0.5])
    for a, b in zip(ours, theirs):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            got, want = ours_opt.state[a][name], theirs_opt.state[b][name]
            assert (got.device, got.dtype, got.shape) == (want.device, want.dtype, want.shape), name
        assert ours_opt.state[a]["step"].device.type == (device if fused else "cpu")
        if device != "meta":
            assert all(torch.equal(ours_opt.state[a][k], theirs_opt.state[b][k]) for k in ours_opt.state[a])
    if device != "meta":  # the resumed step runs (the fused CUDA kernel refuses a ``step`` on the CPU)
        for a, b in zip(ours, theirs):
            a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        ours_opt.step(), theirs_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# ----------------------------------------------------------------------------------------------
# A verb's result: named only while it is whole, written under the run's lock


EVALUATE = ("evaluate", "digits", "--num", "8", "--steps", "2", "--features", "none", "--quiet")


def test_the_run_stays_locked_while_its_report_and_provenance_are_written(tmp_path, monkeypatch):
    """The lock was released before the manifest's artifacts, provenance.json and report.html were written: a
    second `pgraft evaluate` could run in the directory meanwhile, and the record mixed the two runs."""
    import pgraft_cli.report.html as html

    real, seen = html.render_report, []

    def render_while_checking_the_lock(run_dir):
        try:
            with RunStore(Path(run_dir), is_main=True):
                seen.append("free")
        except RunLockedError:
            seen.append("locked")
        return real(run_dir)

    monkeypatch.setattr(html, "render_report", render_while_checking_the_lock)
    proc = cli_run(*EVALUATE, "--run-dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert seen == ["locked"]


def test_a_rerun_stopped_halfway_names_nothing_of_the_run_before(tmp_path, monkeypatch):
    """A rerun with another seed stopped halfway left the manifest naming the first run's summary and its
    report.html beside the new recipe (seed 1's FID under seed 2's recipe); a finetune's rerun left a summary
    its stage had deleted and `pgraft report` crashed. The result's names and report go once a stage starts
    again; a rerun that redoes nothing, stopped, keeps them."""
    import pgraft_cli.stages.sample as stage  # (evaluate_model imports iter_images from it as it runs)
    from pgraft_cli.errors import PgraftError

    run = tmp_path / "run"
    assert cli_run(*EVALUATE, "--run-dir", run).returncode == 0
    finished = lambda: RunStore(run, is_main=False).artifacts()[0] == "evaluate" and (run / "report.html").is_file()  # noqa: E731
    assert finished()

    def stopped(*args, **kwargs):  # after the sample stage, while the images are measured
        raise PgraftError("stopped halfway")

    monkeypatch.setattr(stage, "iter_images", stopped)
    assert cli_run(*EVALUATE, "--run-dir", run).returncode == 2  # the same run again: nothing redone
    assert finished()
    assert cli_run(*EVALUATE, "--seed", "2", "--run-dir", run).returncode == 2  # another seed: sampled again
    assert RunStore(run, is_main=False).artifacts() == (None, {})
    assert not (run / "report.html").exists()
    monkeypatch.undo()
    shown = cli_run("report", run)
    assert shown.returncode == 0 and (run / "report.html").is_file(), shown.stderr
    assert cli_run(*EVALUATE, "--run-dir", run).returncode == 0  # finished again: named again
    (run / "evaluate.json").unlink()  # a named summary gone: the report shows the stages, no traceback
    assert cli_run("report", run).returncode == 0


def test_an_export_stopped_halfway_is_marked_incomplete(tmp_path, monkeypatch):
    """Re-exporting seed 1 over a folder of seed 0 overwrote PNGs in place and wrote sampler.json last: stopped
    after 3 images, the folder held seed 1's first images under seed 0's sampler.json. It says complete: false
    until the last image is written now."""
    import pgraft_cli.stages.sample as stage

    out = tmp_path / "png"
    assert cli_run("sample", "digits", "--num", "8", "--steps", "1", "--run-dir", tmp_path / "run", "--out", out,
                   "--quiet").returncode == 0
    settings = json.loads((out / "sampler.json").read_text())
    assert settings["complete"] is True
    real, written = stage.atomic_write_bytes, []

    def fail_after_three(path, data):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(stage, "atomic_write_bytes", fail_after_three)
    with pytest.raises(OSError):
        stage.export_pngs(tmp_path / "run", out, {**settings, "seed": 1})
    partial = json.loads((out / "sampler.json").read_text())
    assert partial["complete"] is False and partial["seed"] == 1


def test_a_training_checkpoint_keeps_every_loss(tmp_path):
    """Checkpoints kept the last 5000 losses: a run of 5200 steps resumed at 5150 reported 5100 of them and a
    loss curve shifted against the uninterrupted run's. Every loss is kept now, to the bit; older checkpoints
    (losses in the metadata) still load."""
    import random

    from safetensors.torch import save_file

    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.1)
    losses = [random.Random(0).random() / (k + 1) for k in range(6000)]
    save_training_state(tmp_path / "state.safetensors", {}, {}, [param], opt, 6000, losses)
    step, back, _, _ = load_training_state(tmp_path / "state.safetensors", [param], opt)
    assert step == 6000 and back == losses
    save_file({"model.w": torch.zeros(1)}, str(tmp_path / "old.safetensors"),
              metadata={"step": "3", "losses": json.dumps([0.5, 0.25, 0.125])})
    assert load_training_state(tmp_path / "old.safetensors", [param], opt)[:2] == (3, [0.5, 0.25, 0.125])


def test_a_training_stage_with_a_checkpoint_shows_as_partial(tmp_path):
    """A training stage has no shards: `pgraft status` showed one stopped with a checkpoint on disk as "pending 0",
    while the README promises "partial" for a stage under way."""
    with RunStore(tmp_path / "run") as store:
        store.open_stage("finetune", {"steps": 10}, {})
        store.open_stage("sample", {"num": 4}, {}, num_shards=2)
    assert states(store)["finetune"][0] == "pending" and states(store)["sample"][0] == "pending"
    (tmp_path / "run" / "finetune").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(tmp_path / "run" / "finetune" / "state.safetensors", b"checkpoint")
    assert states(store)["finetune"][0] == "partial" and states(store)["sample"][0] == "pending"
