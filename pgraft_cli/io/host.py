"""The host process: the output paths it may write (checked before any work), its allocator, its CPU's bf16."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import tempfile
from pathlib import Path

from ..errors import OutputPathError


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
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):
        return False


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX; oneDNN on), so that bf16 autocast is
    faster than float32 here; elsewhere oneDNN emulates bf16 (AVX512 without BF16) or torch falls back to
    reference kernels, both slower than float32. Other architectures: False (not measured)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False  # without oneDNN, bf16 convolutions take torch's slow reference kernels
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
