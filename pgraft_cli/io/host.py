"""The host process: the output paths it may write (checked before any work), its allocator, its garbage collector,
its float32 arithmetic while it measures, its CPU (what it is called, its vector instructions, its bf16)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from ..errors import OutputPathError

T = TypeVar("T")


def check_writable(path: Path, flag: str, is_file: bool = False) -> None:
    """Refuse a path whose nearest existing folder (itself, for a folder) is a file or cannot be written to."""
    ancestor = next((p for p in (*([] if is_file else [path]), *path.parents) if p.exists()), Path("."))
    if not ancestor.is_dir():
        raise OutputPathError(f"{flag} {path} lies under {ancestor}, which is a file, not a folder; pass another path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {path} cannot be written ({(exc.strerror or str(exc)).lower()} in {ancestor}); "
                              f"pass a path in a folder you can write to") from None


def tune_allocator() -> bool:
    """Keep glibc from handing every mid-sized tensor fresh pages from the kernel.

    glibc serves allocations above its mmap threshold (128 KiB at start, adjusted upwards only
    when a larger mmap'd block is freed) with ``mmap`` and returns them with ``munmap``, so each
    network call of a small lane pays page faults for its activations: measured 20 % slower
    sampling of the digits model in a fresh process (bench/RESULTS.md). A fixed 32 MiB threshold
    (glibc's own maximum) keeps such blocks on the heap for reuse. Returns whether it applied.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))


def release_free_memory() -> bool:
    """Give the free memory of every glibc arena back to the kernel (``malloc_trim``). Threads that
    allocated (``stages.sample.side_by_side``'s lanes) leave their arenas holding their free blocks (up
    to ``tune_allocator``'s trim threshold each: +217 MB of peak RSS on the main job, bench/RESULTS.md)
    that no later stage, on the main thread, would reuse. Returns whether it applied."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library where it is glibc (read once: ``platform.libc_ver`` reads the interpreter's binary)."""
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_ONE_COMMAND = False  # set by the console entry (``one_command_process``); never in the tests' in-process runs


def one_command_process() -> None:
    """Mark this process as one ``pgraft`` command that exits when it is done (the console entry):
    ``gc_paused`` then freezes what survives its block, and ``skip_final_collection`` applies."""
    global _ONE_COMMAND
    _ONE_COMMAND = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold CPython's cyclic garbage collector for a block of imports.

    Importing diffusers (and the torch internals, peft, transformers and scipy it pulls in) creates
    about a million objects that live as long as the process; on CPython 3.11 (where it was measured)
    each full collection rescans all of them, one running whenever the heap has grown by a quarter:
    about 0.8 s of the 2.8 s import on the 2-core box (bench/RESULTS.md). The collector is switched
    back on (if it was on) when the block ends, even by an exception.

    In a one-command process (``one_command_process``) the block's end then collects the young
    generations (about 0.2 s) and freezes what survives (``gc.freeze``: the permanent generation, which
    collections skip), or the first collections after it would scan it all once more. The collection
    comes first because frozen garbage is never collected: an import leaves reference cycles behind
    (torch._dynamo's module-level ``torch.fx.wrap`` call keeps its own frame), and such a frame keeps
    its callers' frames, with the locals they have when they return. What is frozen is then what was
    alive: the imported modules' objects and the callers' objects of that moment, which is why the
    block holds imports only (weights are read after it). Elsewhere (a process that goes on working,
    such as the tests') nothing is frozen.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _ONE_COMMAND:
            gc.collect(1)
            gc.freeze()
        if was_enabled:
            gc.enable()


def skip_final_collection() -> None:
    """At the end of a one-command process (``one_command_process``; else nothing): spare the
    interpreter's last collection the objects alive now.

    At exit CPython runs a full collection over every object still tracked, about 1 s after the
    imports a model run makes; ``gc.freeze`` moves them to the permanent generation, which that
    collection skips. So the finalizers (``__del__``, ``weakref.finalize`` without ``atexit``) of objects
    left in reference cycles do not run at exit, which CPython never promised; ``atexit`` handlers
    still run (``tempfile``'s clean-up among them), and every file pgraft wrote is closed by then.
    """
    if _ONE_COMMAND:
        gc.freeze()


# torch's per-backend float32 settings (torch >= 2.9): TF32 or bf16 inside a float32 matmul, convolution or RNN
FLOAT32_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 arithmetic inside the block, for numbers a run reports (FID and KID features, the copy test's
    distances, rewards and judges): the same images give the same features on any GPU and on the CPU, to float32
    rounding.

    torch runs cuDNN's float32 convolutions in TF32 on Ampere and later GPUs by default (10 mantissa bits in the
    products), and ``torch.set_float32_matmul_precision("high"/"medium")``, which training scripts and libraries
    set, does the same to matmuls (and "medium" to bf16 in oneDNN's CPU matmuls). The block sets every backend's
    ``fp32_precision`` to "ieee" (torch >= 2.9), and torch's older global settings to agree with it: cuDNN's
    ``allow_tf32`` flag off and the matmul precision "highest" (what a TorchScript network saved before torch 1.7
    reads, and what code inside the block may ask for: torch refuses to answer while the two disagree). It puts
    back what it found, even on an exception: every setting reads as it did before. One thing it cannot put back:
    cuDNN's convolution and RNN settings follow their parent's (``torch.backends.cudnn.fp32_precision``) by
    default, and setting cuDNN's older flag, which the block must do for torch's getters to answer inside it,
    fixes them at a value; torch has no way to set that default back. They read as before, but a later change to
    the parent no longer reaches them, as after torch's own ``torch.backends.cudnn.flags()`` block (measured on
    torch 2.13). Where the older settings already disagreed with the newer ones on
    entry (torch raises on reading them), it leaves them as they were. Sampling and training keep the user's
    settings. The settings are the process's: two threads inside blocks at once would restore each other's."""
    import torch

    backends = [b for b in (_backend(torch.backends, path) for path in FLOAT32_BACKENDS) if hasattr(b, "fp32_precision")]
    saved = [b.fp32_precision for b in backends]
    cudnn = matmul = None
    try:
        with _first_time_quiet():  # torch 2.9 warns, once a process, that the older settings are deprecated
            cudnn = _unless_mixed(torch._C._get_cudnn_allow_tf32)
            matmul = _unless_mixed(torch.get_float32_matmul_precision)
            if cudnn is not None:
                torch._C._set_cudnn_allow_tf32(False)
            if matmul is not None:
                torch.set_float32_matmul_precision("highest")
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        if matmul is not None:
            torch.set_float32_matmul_precision(matmul)  # before torch 2.9 this is cuBLAS's allow_tf32 too
        if cudnn is not None:
            torch._C._set_cudnn_allow_tf32(cudnn)
        for b, value in zip(backends, saved):
            b.fp32_precision = value


_QUIETED = False  # whether ieee_float32 has touched torch's older settings once in this process


@contextlib.contextmanager
def _first_time_quiet() -> Iterator[None]:
    """Warnings ignored the first time through (torch's deprecation warning about its older TF32 settings comes
    once a process), untouched afterwards: ``warnings.catch_warnings`` makes Python forget which warnings it has
    shown, so entering it on every call would repeat every once-only warning of the caller's code."""
    global _QUIETED
    if _QUIETED:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    _QUIETED = True


def _unless_mixed(getter: Callable[[], T]) -> Optional[T]:
    """``getter()``, or None where torch refuses to answer: its older and newer settings disagree."""
    try:
        return getter()
    except RuntimeError:
        return None


def _backend(root: object, path: str) -> object:
    for part in path.split("."):
        root = getattr(root, part, None)
    return root


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX; oneDNN on), so that bf16 autocast is
    faster than float32 here; elsewhere oneDNN emulates bf16 (AVX512 without BF16) or torch falls back to
    reference kernels, both slower than float32. Other architectures: False (not measured)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False  # without oneDNN, bf16 convolutions take torch's slow reference kernels
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


CPUINFO = Path("/proc/cpuinfo")  # Linux's description of each CPU


def cpu_name() -> str:
    """This CPU's model name as the OS reports it (Linux's ``/proc/cpuinfo``, with its family and model numbers
    where it gives them: a VM may name only the vendor's line, "AMD EPYC", for CPUs generations apart), else
    ``platform.processor()``, else the machine's architecture."""
    try:
        fields: dict[str, str] = {}
        for line in CPUINFO.read_text().splitlines():
            if not line.strip():
                break  # the first CPU's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), " ".join(value.split()))
        if fields.get("model name"):
            numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if fields.get(k)]
            return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu() -> str:
    """What a CPU timing was measured on, in one line: the model name, the CPUs this process may run on, torch's
    threads, ATen's CPU dispatch level (``torch.backends.cpu.get_cpu_capability``: AVX2, AVX512, ...; oneDNN's
    convolutions pick their own instructions, but within what the CPU has) and whether it multiplies bf16
    natively. The same code runs at very different speeds on two 2-core machines (bench/RESULTS.md: the main
    job in 55-63 s on an AVX512-BF16 CPU, 218-226 s on an AVX2 one), so a run's seconds are recorded with this."""
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu_name()}, {cpus} CPUs, torch {torch.get_num_threads()} threads, {isa}"
            + (", native bf16" if native_cpu_bf16() else ""))


def describe_device(device: str) -> Optional[str]:
    """The hardware behind a torch device string, for the record of a run's seconds: the GPU's name for
    ``cuda``, :func:`describe_cpu` for ``cpu``, else None."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:  # not a device string: nothing to name (a record must not fail a finished run)
        return None
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return describe_cpu() if kind == "cpu" else None
