"""The run store: a run directory with a manifest, atomic outputs, sharded stages and a lock.

Layout of a run directory::

    RUN/
      manifest.json            stage -> {key, status, config, inputs, outputs {path: sha256}, ...};
                               the verb whose result the run holds and its named artifacts
      recipe.toml              the fully resolved recipe of the last command
      provenance.json          per verb: command, versions, device, time, the output's hash
      .lock                    held (flock) by the process working in RUN
      <stage>/shard-00000.safetensors   one finished shard, written atomically
      <stage>/shard-00000.sha256        its checksum, written after the shard

A stage's **key** hashes its config (every recipe key it reads), the content of its inputs (digests
of the tensors and weights it reads, and :meth:`RunStore.outputs_digest` of the stages it reads
from) and the pgraft version, so a changed input redoes the stage and everything downstream, and a
cached stage never stands in for one that would compute something else. Work is cut into
shards; a shard is done when its file and checksum file both exist and agree, so after Ctrl-C or
``kill -9`` at any moment the stage resumes from the last finished shard. A stage whose key changed
is cleared and redone. Under ``accelerate launch`` every process writes its own shards and only the
main process writes the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Optional

from .. import __version__
from ..errors import RunLockedError, RunStoreError
from .host import describe_device

if TYPE_CHECKING:  # torch is imported where tensors are read: `pgraft status` stays fast
    from torch import Tensor

MANIFEST = "manifest.json"
RECIPE = "recipe.toml"  # the fully resolved recipe of the last command
PROVENANCE = "provenance.json"  # per verb: command, versions, device, time, the output's hash
REPORT = "report.html"  # the verb's report (report.html renders it), dropped when its result goes stale
_PACKAGES = ("pgraft", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "matplotlib")
_UMASK = os.umask(0)
os.umask(_UMASK)
USUAL_FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file under this process's umask


# ----------------------------------------------------------------------------------------------
# Atomic files


@contextlib.contextmanager
def atomic_path(path: Path | str, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    Readers see either the old file or the whole new one, never a partial write. On error the
    temporary file is removed and ``path`` is untouched. ``durable=False`` skips the two fsyncs
    (file and directory, ~4 ms each on a disk) for files checked against a recorded checksum
    before use (shards): after a power loss such a file is redone, never read wrong; a killed
    process still leaves the old file or the whole new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, USUAL_FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.chmod(tmp, USUAL_FILE_MODE)  # again: a writer may have replaced the file (safetensors' save_file: 0600)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes, durable: bool = True) -> None:
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), durable)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_temp_files(directory: Path) -> None:
    """Delete what :func:`atomic_path` leaves behind when its process is killed mid-write."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(tensor: Any) -> str:
    """sha256 of a tensor's dtype, shape and values: what a stage that reads it depends on."""
    t = tensor.detach()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    _hash_values(h, t)
    return h.hexdigest()


def rows_digest(rows: Any, batch: int = 256) -> str:
    """:func:`tensor_digest` of ``rows`` (a tensor, or a reader sliced by row ranges such as
    ``data.DataRows``), read ``batch`` rows at a time: the same digest without holding every row."""
    first = rows[0:batch]
    h = hashlib.sha256(f"{first.dtype}:{(len(rows), *first.shape[1:])}:".encode())
    for start in range(0, len(rows), batch):
        _hash_values(h, first if start == 0 else rows[start:start + batch])
    return h.hexdigest()


def _hash_values(h: Any, tensor: Any) -> None:
    """Feed a tensor's bytes (C order) to a hash, through a buffer view rather than a copy."""
    import torch

    t = tensor.detach().contiguous().cpu()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def state_digest(state: dict[str, Any]) -> str:
    """sha256 of a state dict (weights): every name with its tensor's digest, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(f"{name}\0{tensor_digest(state[name])}\n".encode())
    return h.hexdigest()


def content_key(obj: Any) -> Any:
    """A JSON-able description of ``obj`` for a stage key: tensors and modules become digests.

    Dataclasses become dicts of their fields (so a field added later is keyed automatically),
    ``nn.Module`` objects the digest of their state dict, tensors their :func:`tensor_digest`.
    """
    import dataclasses

    import torch

    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_digest(obj)}
    if isinstance(obj, torch.nn.Module):
        return {"weights": state_digest(obj.state_dict())}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: content_key(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): content_key(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [content_key(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def stage_key(stage: str, config: dict[str, Any], inputs: dict[str, Any]) -> str:
    """Hash of what determines a stage's outputs: its config, its inputs and the pgraft version."""
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "pgraft": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The store


@dataclass
class StageStatus:
    name: str
    state: str  # done | partial | pending | stale
    shards_done: int
    shards_total: Optional[int]
    key: Optional[str]


class Dist(NamedTuple):
    """This process among the processes a stage runs on: process ``rank`` of ``size`` does the shards
    ``k % size == rank``; ``barrier`` (None for one process) waits for all of them."""

    rank: int = 0
    size: int = 1
    barrier: Optional[Callable[[], None]] = None

    def wait(self) -> None:
        if self.barrier is not None:
            self.barrier()


def versions() -> dict[str, Optional[str]]:
    """Installed versions of the packages a run depends on (None where one is not installed); read
    once per process (each read parses a package's metadata file, ~1.5 ms)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, Optional[str]]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = __version__ if name == "pgraft" else None
    return out


class RunStore:
    """One run directory. Use as a context manager to hold its lock (main process only)."""

    def __init__(self, root: Path | str, is_main: bool = True):
        self.root = Path(root)
        self.is_main = is_main
        self._lock_fd: Optional[int] = None

    # -- lock -----------------------------------------------------------------------------------
    def __enter__(self) -> "RunStore":
        if self.root.exists() and not self.root.is_dir():
            raise RunStoreError(f"--run-dir {self.root} is a file, not a directory; pass another --run-dir")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self.acquire_lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release_lock()

    def acquire_lock(self) -> None:
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.root} is in use by {holder}; wait for it to finish "
                f"or pass another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- manifest -------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {"pgraft_version": __version__, "stages": {}}
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise RunStoreError(
                f"{path} is not a valid pgraft manifest; the run directory is damaged: delete it or pass "
                f"another --run-dir"
            )
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        if self.is_main:
            manifest["pgraft_version"] = __version__
            atomic_write_text(self.root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))

    def stage(self, name: str) -> "Stage":
        """A stage's finished shards, to read: ``store.stage("sample").tensors("index", "images")``."""
        return Stage(self.root / name)

    def open_stage(self, name: str, config: dict[str, Any], inputs: dict[str, Any],
                   num_shards: Optional[int] = None) -> "StageRun":
        """Open a stage; clears its old shards when its key changed. Returns a :class:`StageRun`.

        The main process also clears shards the manifest does not account for (no entry: their key
        is unknown) and temporary files left by a killed writer. A stage whose outputs changed after
        it finished is recorded as partial again, so the shards that no longer check out are redone.
        """
        key = stage_key(name, config, inputs)
        manifest = self.read_manifest()
        entry = manifest["stages"].get(name)
        directory = self.root / name
        if self.is_main:
            if entry is None or entry.get("key") != key:
                shutil.rmtree(directory, ignore_errors=True)  # shards of another (or an unknown) key
                entry = None
            _remove_temp_files(directory)
        if entry is None or entry.get("status") != "done" or not self._outputs_intact(entry):
            manifest["stages"][name] = {
                "key": key, "status": "partial", "config": config, "inputs": inputs,
                "num_shards": num_shards, "outputs": {}, "started": time.time(),
            }
            # work starts again: the previous verb's result (its summary may lie in a stage just cleared) and its
            # report are no longer this run's; a rerun that redoes nothing keeps them
            manifest.pop("verb", None)
            manifest.pop("artifacts", None)
            self._write_manifest(manifest)
            if self.is_main:
                (self.root / REPORT).unlink(missing_ok=True)
        return StageRun(self, name, key, directory, num_shards)

    def run_sharded(self, name: str, config: dict[str, Any], inputs: dict[str, Any], num_shards: int,
                    work: Callable[[int], dict[str, Any]], dist: Dist = Dist(),
                    todo: Optional[Callable[[list[int]], None]] = None,
                    outputs: Optional[Callable[["StageRun"], list[Path]]] = None, stamp: bool = False,
                    map_work: Callable[[Callable[[int], Any], list[int]], Iterable[Any]] = map) -> "StageRun":
        """Run (or resume) a stage of ``num_shards`` safetensors shards; returns it, finished.

        This process writes its shards (``k % dist.size == dist.rank``) that are not done yet:
        ``work(k)`` returns shard k's tensors; ``todo(ks)`` is told which shards this process will
        write (a progress bar's total). ``map_work(fn, ks)`` yields ``fn(k)`` for each k in order (the
        built-in ``map``: one shard after the other; ``stages.sample.side_by_side``: several at once);
        each shard is written, in order, as soon as it is yielded. ``stamp`` records in each shard's
        metadata the stage, its key, the shard, the process, the wall seconds this process waited for
        it (``pgraft.seconds``: they add up to the stage's time less the writes, also when shards
        overlap) and the seconds its own ``work`` took (``pgraft.work_seconds``). Once every
        process is through, the main process checks that all shards are there, writes
        ``outputs(stage)`` (further files, e.g. settings; it may refuse the stage by raising) and
        records the stage as done.
        """
        from safetensors.torch import save_file

        stage = self.open_stage(name, config, inputs, num_shards=num_shards)
        # what every process has left to write, read before the others pass the barrier (the main process's
        # reading counts: it may just have cleared a stale stage, and no shard is written before it arrives)
        stage.pending = [] if stage.done else [k for k in range(num_shards) if not stage.shard_done(k)]
        dist.wait()  # the main process may have cleared a stale stage; the others wait for that
        if stage.done:
            return stage
        mine = [k for k in range(num_shards) if k % dist.size == dist.rank and not stage.shard_done(k)]
        if todo is not None:
            todo(mine)
        def timed(k: int) -> tuple[dict[str, Any], float]:
            tic = time.perf_counter()
            return work(k), time.perf_counter() - tic

        results = map_work(timed, mine)
        try:
            waited = time.perf_counter()
            for k, (tensors, own) in zip(mine, results):
                # this process's wall time for the shard (the wait since the last write: shards computed
                # side by side overlap, so their own times would add up to more than the stage took)
                seconds, metadata = time.perf_counter() - waited, None
                if stamp:
                    metadata = {"pgraft.stage": name, "pgraft.stage_key": stage.key, "pgraft.shard": str(k),
                                "pgraft.process": f"{dist.rank}/{dist.size}", "pgraft.seconds": f"{seconds:.6f}",
                                "pgraft.work_seconds": f"{own:.6f}"}
                with stage.write_shard(k) as tmp:
                    save_file(tensors, str(tmp), metadata=metadata)
                waited = time.perf_counter()
        finally:
            getattr(results, "close", lambda: None)()  # a generator's clean-up, also when a write fails
        dist.wait()
        if self.is_main:
            missing = [k for k in range(num_shards) if not stage.shard_done(k)]
            if missing:
                raise RunStoreError(f"shards {missing[:5]} of the {name} stage are missing; re-run to resume")
            shards = [stage.shard_path(k) for k in range(num_shards)]
            stage.finish(shards + (outputs(stage) if outputs is not None else []))
        dist.wait()  # the others read the finished stage next
        return stage

    def outputs_digest(self, name: str) -> Optional[str]:
        """sha256 of a finished stage's outputs (their paths and checksums); None if it is not done.

        A stage that reads another stage's outputs puts this among its inputs, so it is redone
        whenever those outputs were made again (a new key upstream, or a repaired shard).
        """
        entry = self.read_manifest()["stages"].get(name)
        if entry is None or entry.get("status") != "done":
            return None
        blob = json.dumps(entry.get("outputs", {}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    # -- named artifacts and provenance ----------------------------------------------------------
    def record_artifacts(self, verb: str, artifacts: dict[str, Any]) -> None:
        """Name what the verb's result is made of (``summary``, ``samples``, ``checkpoint`` ...) in the
        manifest, as paths relative to the run directory (or JSON values): the report reads only these."""
        manifest = self.read_manifest()
        manifest["verb"], manifest["artifacts"] = verb, {"recipe": RECIPE, **artifacts}
        self._write_manifest(manifest)

    def artifacts(self) -> tuple[Optional[str], dict[str, Any]]:
        """The verb whose result the run holds and its named artifacts (None and {} before one finished)."""
        manifest = self.read_manifest()
        return manifest.get("verb"), manifest.get("artifacts") or {}

    def read_artifact(self, name: str) -> Any:
        """A JSON artifact by name; None when the run has none of that name or its file is unreadable."""
        rel = self.artifacts()[1].get(name)
        if not isinstance(rel, str):
            return None
        try:
            return json.loads((self.root / rel).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def record_provenance(self, verb: str, **info: Any) -> dict[str, Any]:
        """Merge a verb's facts (device, seconds, out ...) with the environment into ``provenance.json``; the
        device's hardware as ``device_name`` (a GPU's name, or ``host.describe_cpu``: the CPU's model, threads, ATen dispatch level)."""
        import platform
        import sys

        prov = self.read_provenance()
        entry = {"verb": verb, "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"), "versions": versions(),
                 "platform": platform.platform(), "command": " ".join(["pgraft", *sys.argv[1:]]), **info}
        if "device_name" not in info:  # a caller that read it passes it
            entry["device_name"] = describe_device(str(info["device"])) if info.get("device") else None
        if not entry["device_name"]:
            del entry["device_name"]
        out = info.get("out")
        if out and Path(out).is_file():
            entry["out_bytes"] = Path(out).stat().st_size
            entry["out_sha256"] = sha256_file(out)
        prov[verb] = entry
        atomic_write_text(self.root / PROVENANCE, json.dumps(prov, indent=2, sort_keys=True, default=str))
        return prov

    def read_provenance(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / PROVENANCE).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def write_json(self, relpath: str, obj: Any) -> Path:
        path = self.root / relpath
        atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
        return path

    def status(self) -> list[StageStatus]:
        """Each recorded stage as done, partial (with shard counts) or pending."""
        out = []
        for name, entry in self.read_manifest()["stages"].items():
            total = entry.get("num_shards")
            done = len(StageRun(self, name, entry.get("key", ""), self.root / name, total).done_shards())
            state = entry.get("status", "pending")
            if state == "done" and not self._outputs_intact(entry):
                state = "stale"
            elif state != "done":  # shards written, or another file of its work (a training checkpoint)
                folder = self.root / name
                state = "partial" if done or (folder.is_dir() and any(folder.iterdir())) else "pending"
            out.append(StageStatus(name, state, done, total, entry.get("key")))
        return out

    def _outputs_intact(self, entry: dict[str, Any]) -> bool:
        for rel, digest in entry.get("outputs", {}).items():
            path = self.root / rel
            if not path.exists() or sha256_file(path) != digest:
                return False
        return True


class StageRun:
    """A stage being worked on: its shards and, once finished, its recorded outputs."""

    def __init__(self, store: RunStore, name: str, key: str, directory: Path,
                 num_shards: Optional[int]):
        self.store, self.name, self.key, self.dir, self.num_shards = store, name, key, directory, num_shards
        self.pending: list[int] = []  # run_sharded: the shards no process had written when the stage (re)started

    @property
    def done(self) -> bool:
        entry = self.store.read_manifest()["stages"].get(self.name, {})
        return (entry.get("key") == self.key and entry.get("status") == "done"
                and self.store._outputs_intact(entry))

    def shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.safetensors"

    def _sum_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.sha256"

    def shard_done(self, index: int) -> bool:
        path, sums = self.shard_path(index), self._sum_path(index)
        if not (path.exists() and sums.exists()):
            return False
        return sums.read_bytes().strip() == sha256_file(path).encode()

    def done_shards(self) -> list[int]:
        if not self.dir.exists():
            return []
        indices = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob(SHARD_GLOB))
        return [i for i in indices if self.shard_done(i)]

    @contextlib.contextmanager
    def write_shard(self, index: int) -> Iterator[Path]:
        """Yield a temp path to write shard ``index`` to; it is committed atomically on success.

        Neither the shard nor its checksum is fsynced: ``shard_done`` trusts a shard only where both
        were written whole and agree, so a shard that a power loss damaged is computed again."""
        with atomic_path(self.shard_path(index), durable=False) as tmp:
            yield tmp
        atomic_write_text(self._sum_path(index), sha256_file(self.shard_path(index)), durable=False)

    def finish(self, outputs: list[Path], extra: Optional[dict[str, Any]] = None) -> None:
        """Record the stage as done with its outputs' checksums (main process)."""
        manifest = self.store.read_manifest()
        entry = manifest["stages"].setdefault(self.name, {"key": self.key})
        entry.update(extra or {})
        entry["key"] = self.key
        entry["status"] = "done"
        entry["finished"] = time.time()
        entry["seconds"] = entry["finished"] - entry.get("started", entry["finished"])
        entry["outputs"] = {str(p.relative_to(self.store.root)): sha256_file(p) for p in outputs}
        self.store._write_manifest(manifest)


# ----------------------------------------------------------------------------------------------
# Training state (corrector, fine-tune): safetensors, never pickle


def derive_seed(*parts: Any) -> int:
    """A generator seed from a tuple (run seed, purpose, step ...): a resumed stage draws the same."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def save_training_state(path: Path | str, model_state: dict[str, Any], ema_state: dict[str, Any],
                        params: list[Any], opt: Any, step: int, losses: list[float]) -> None:
    """Weights, EMA weights, the optimizer's per-parameter moments of ``params`` and every loss so far (a
    float64 tensor: a resumed run's loss curve and final loss are the uninterrupted run's), atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64).reshape(-1)
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if isinstance(st.get(name), torch.Tensor):
                tensors[f"opt.{i}.{name}"] = st[name]
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"step": str(step)})


def load_training_state(path: Path | str, params: list[Any], opt: Any) -> tuple[int, list[float], dict, dict]:
    """Restore the optimizer state of ``params``; returns (step, losses, model state, EMA state)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    # torch's own loader places each value: the moments on the parameter's device, ``step`` on the CPU,
    # or (fused/capturable: the kernel reads it from device memory) on the parameter's device as float32
    state = opt.state_dict()
    index = {id(p): k for k, p in enumerate(p for group in opt.param_groups for p in group["params"])}
    for i, p in enumerate(params):
        st = {name: tensors[f"opt.{i}.{name}"] for name in ("exp_avg", "exp_avg_sq", "momentum_buffer", "step")
              if f"opt.{i}.{name}" in tensors}
        if "step" in st:
            st["step"] = st["step"].reshape(())
        if st:
            state["state"][index[id(p)]] = st
    opt.load_state_dict(state)
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    losses = tensors["losses"].tolist() if "losses" in tensors else json.loads(meta.get("losses", "[]"))  # (older: the last 5000)
    return int(meta["step"]), losses, model_state, ema_state


# ----------------------------------------------------------------------------------------------
# Reading a stage's shards

SHARD_GLOB = "shard-*.safetensors"


def read_shard(path: Path, *keys: str) -> dict[str, Tensor]:
    """The ``keys`` (all if none) of one shard file that it holds, and nothing else."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in (keys or f.keys()) if k in f.keys()}


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Ascending positions as half-open runs ``[a, b)`` of consecutive positions."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class Stage:
    """A stage's shards, read by name (:meth:`RunStore.stage`); keys the shards do not hold
    (``captured`` without ``--capture-at``, ``class_label`` of an unconditional model ...) are left out."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def paths(self) -> list[Path]:
        """The shard files, in index order (shard k holds the k-th run of indices)."""
        return sorted(self.dir.glob(SHARD_GLOB))

    def shards(self, *keys: str) -> Iterator[dict[str, Tensor]]:
        """The shards one at a time in index order, each read only for ``keys`` (all if none)."""
        for path in self.paths():
            yield read_shard(path, *keys)

    def tensors(self, *keys: str) -> dict[str, Tensor]:
        """The named tensors, concatenated over the shards in index order; only those keys are read."""
        import torch

        found: dict[str, list[Tensor]] = {}
        for shard in self.shards(*keys):
            for k, v in shard.items():
                found.setdefault(k, []).append(v)
        return {k: torch.cat(found[k]) for k in keys if k in found}

    def rows(self, indices: Tensor, *keys: str) -> dict[str, Tensor]:
        """The named tensors for the sample ``indices`` only (rows in index order).

        Each shard's ``index`` vector says which of its rows are wanted; only those rows are read
        (``safe_open(...).get_slice``), one run of consecutive rows at a time.
        """
        import torch
        from safetensors import safe_open

        wanted = set(int(i) for i in indices)
        found: dict[str, list[Tensor]] = {}
        for path in self.paths():
            with safe_open(str(path), "pt") as f:
                rows = [r for r, i in enumerate(f.get_tensor("index").tolist()) if i in wanted]
                for k in (k for k in keys if k in f.keys() and rows):
                    sl = f.get_slice(k)
                    found.setdefault(k, []).extend(sl[a:b] for a, b in _runs(rows))
        return {k: torch.cat(found[k]) for k in keys if k in found}

    def seconds(self) -> float:
        """The wall seconds recorded in the shards (``pgraft.seconds``), summed: the stage's time less its
        writes, over every run that made its shards (survives resumes)."""
        from safetensors import safe_open

        total = 0.0
        for p in self.paths():
            with safe_open(str(p), "pt") as f:
                total += float(f.metadata().get("pgraft.seconds", "0"))
        return total
