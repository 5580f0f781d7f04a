"""Cross-attention keys and values computed once per conditioning, for the forward-only stages.

A text network's cross-attention layers project the prompt's hidden states to keys and values
(``to_k``, ``to_v``) at every call, though a sampler passes the same states at every step. SD2's
UNet has 16 such layers: 3.9 GFLOPs a row and call (a guided image is two rows) whatever the
resolution, by ``torch.utils.flop_counter``'s count 27 % of a call at 64 px and about 0.5 % at
512 px (SDXL's: 3.3 % at 512 px, 0.8 % at 1024 px). Inside :func:`cross_attention_cache` each of
those projections keeps its last output, per thread, and returns it again when it is called on the
very same input tensor (the same object, not written since: an inference tensor, which keeps no
version counter, by its identity alone), with the same weights (the same tensor objects on the same
storage, at the same version), under the same autocast and grad modes: the same kernel on the same
operands, so the outputs are bitwise those of a fresh call. A write into a weight through ``.data``
moves no version counter and is not seen: no stage writes weights inside the block. The returned
output is the kept tensor itself, so its reader must not write into it (diffusers' attention processors
only read the keys and values).

Only plain ``nn.Linear`` projections are cached: a peft LoRA layer's output also depends on Python
state (its adapter switched on above a fine-tune's cutoff, off below). A network that ``models.traced``
replays from a trace, or that ``torch.compile`` compiles, never sees the cache (a trace would freeze a
cache hit's tensors). The kept outputs, one ``(rows, tokens, width)`` tensor a projection, live until
the block ends and hold at most ``budget`` bytes together (``CACHE_BUDGET_BYTES``; SD2 at 8 guided
images in float32 keeps about 130 MB, so all of it; a projection whose output would pass the budget
is projected at every call instead).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .traced import TracedForward, traceable

CACHE_BUDGET_BYTES = 512 * 2**20  # the most the kept keys and values of one block hold together


def cross_attention_projections(network: nn.Module) -> list[nn.Linear]:
    """The key and value projections of ``network``'s cross-attention layers that are plain ``nn.Linear``
    (diffusers' ``Attention`` with ``is_cross_attention``; a LoRA-wrapped projection is left out)."""
    found: dict[int, nn.Linear] = {}
    for module in network.modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        for name in ("to_k", "to_v"):
            proj = getattr(module, name, None)
            if type(proj) is nn.Linear:
                found[id(proj)] = proj
    return list(found.values())


def tensor_version(t: Tensor) -> int:
    """``t``'s version counter (it moves on with every in-place write), or -1 for an inference tensor,
    which keeps none: such a tensor is known by its identity alone (nothing in diffusers' forwards
    writes into its inputs)."""
    return -1 if t.is_inference() else t._version


def _state(proj: nn.Linear, x: Tensor) -> tuple:
    """What a projection's output depends on besides its input's values: the weights (object, storage,
    offset, dtype, device, version; the entry keeps the objects and their storages, so no id or
    address in the key is reused while it is held), and the autocast and grad modes of the input's device."""
    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind)
    weights = tuple((id(w), w.untyped_storage().data_ptr(), w.storage_offset(), w.dtype, w.device, tensor_version(w))
                    for w in (proj.weight, proj.bias) if w is not None)
    return (weights, autocast, torch.get_autocast_dtype(kind) if autocast else None,
            torch.is_grad_enabled(), torch.is_inference_mode_enabled())


class _Budget:
    """The bytes the kept outputs of one block hold, against its limit (shared by its projections)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.lock = limit, 0, threading.Lock()

    def swap(self, old: int, new: int) -> bool:
        """Give back ``old`` bytes and take ``new`` if they fit (True), else take nothing (False)."""
        with self.lock:
            self.used -= old
            if self.used + new > self.limit:
                return False
            self.used += new
            return True


class _Cached:
    """A projection's forward that returns its last output again for the same input object."""

    def __init__(self, proj: nn.Linear, budget: _Budget) -> None:
        self.proj, self.budget = proj, budget
        self.local = threading.local()  # one entry per thread: lanes side by side never share one

    def __call__(self, x: Tensor) -> Tensor:
        entry: Optional[tuple] = getattr(self.local, "entry", None)
        state = _state(self.proj, x)
        if entry is not None and entry[0] is x and entry[1] == tensor_version(x) and entry[2] == state:
            return entry[3]
        out = nn.Linear.forward(self.proj, x)
        old = 0 if entry is None else _nbytes(entry[3])
        self.local.entry = None
        if x.requires_grad or out.requires_grad:  # never under autograd: a graph would be shared
            self.budget.swap(old, 0)
        elif self.budget.swap(old, _nbytes(out)):
            held = tuple((w, w.untyped_storage()) for w in (self.proj.weight, self.proj.bias) if w is not None)
            self.local.entry = (x, tensor_version(x), state, out, held)
        return out


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def cross_attention_cache(networks: Iterable[Optional[nn.Module]], enabled: bool = True,
                          budget: int = CACHE_BUDGET_BYTES) -> Iterator[int]:
    """Within the block, each network's cross-attention key and value projections
    (:func:`cross_attention_projections`) return their last output for the same input object, while
    the kept outputs fit ``budget`` bytes; yields how many projections that is. A network replayed
    from traces (``models.traced``) is left alone. Afterwards every projection is as it was (its
    ``forward`` its class's again) and every kept tensor is dropped."""
    projections: dict[int, nn.Linear] = {}
    if enabled:
        for net in networks:
            if net is not None and not isinstance(net, TracedForward) and not traceable(net):
                projections.update((id(p), p) for p in cross_attention_projections(net))
    shared = _Budget(budget)
    installed: list[nn.Linear] = []
    try:
        for proj in projections.values():
            if "forward" not in proj.__dict__:  # already cached by an enclosing block: leave that one
                proj.forward = _Cached(proj, shared)  # type: ignore[method-assign]
                installed.append(proj)
        yield len(installed)
    finally:
        for proj in installed:
            del proj.forward


def cached_projection_count(network: nn.Module) -> int:
    """How many projections of ``network`` are cached right now (tests, and the curious)."""
    return sum(isinstance(p.__dict__.get("forward"), _Cached) for p in cross_attention_projections(network))
