"""A network's forward replayed from TorchScript traces, for the forward-only stages on the CPU.

Eager diffusers code spends about 2 ms of Python a call on the digits UNet (35 convolutions, 30
group norms, 7 attentions, each behind a few layers of ``nn.Module`` calls): 55 % of a call at one
image, 7-9 % at a lane of 64 (bench/RESULTS.md, "The network's forward from a trace"). A
``torch.jit.trace`` of the forward records the same aten operations once and replays them without
that Python, so the same kernels run on the same tensors and the outputs are bitwise the eager ones.

What a trace freezes is what the eager Python decided on its first inputs: branches on shapes,
dtypes and the module's state. So a trace is made per input *signature* (shapes, dtypes, strides,
device, autocast), only for network classes whose forward was read for branches on tensor values
(``TRACEABLE``; there are none in them), never under autograd or in training mode, never with peft
layers (their enable flags are Python state), and each trace is checked against the eager output
of the call it was made on: a trace that differs in one bit, or that fails, leaves that signature
eager. The traces hold the network's own parameters (shared, not copied), so a weight whose data
is swapped (``stages.sample.network_memory_format``) is seen by them; the layout and dtype the
weights are in is part of the signature all the same.

The traces of a network are kept while the network lives (a weak reference), so a command's later
stages reuse the traces its earlier ones made: making one takes about 0.25 s on the digits UNet.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .corrector import VelocityOutput

# diffusers classes whose forward (and blocks) branch only on shapes, dtypes and config: read for the
# diffusers this project pins (UNet2DModel: the digits model, pixel DDPM-style UNets, the corrector)
TRACEABLE = ("UNet2DModel",)

# A signature whose second (warm) eager call took longer than this stays eager: a trace costs about
# 0.25 s and two forwards and saves the ~2 ms of Python a call, nothing worth it for a network this slow
# (a 36 M parameter CIFAR UNet takes 0.36 s at 8 images: its trace would pay for itself after some 1000
# calls; the digits UNet takes 0.04-0.08 s at 64). Bytes never depend on it: a trace is eager's bytes.
TRACE_MAX_CALL_SECONDS = 0.25
_SEEN = object()  # a signature called once: its first call is cold (oneDNN's kernels are made), not timed

# each network's traces by signature (None: that signature runs eager), while the network lives
_TRACES: "weakref.WeakKeyDictionary[nn.Module, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def traceable(network: Optional[nn.Module]) -> bool:
    """Whether ``network`` may run from traces: a ``TRACEABLE`` class without peft (LoRA) layers."""
    if isinstance(network, TracedForward):
        network = network.network
    if network is None or type(network).__name__ not in TRACEABLE:
        return False
    return not any(type(m).__module__.startswith("peft") for m in network.modules())


class _Positional(nn.Module):
    """``network(sample, timestep[, class_labels])`` with positional tensors, as ``torch.jit.trace`` takes them."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        return self.network(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def _signature(t: Optional[Tensor]) -> Any:
    return None if t is None else (tuple(t.shape), t.dtype, t.stride(), t.device)


class TracedForward:
    """``network``'s forward, from a checked trace per input signature for the batch sizes in ``batches``.

    Called as the network is (``(sample, timestep, class_labels=..., return_dict=...)``); every other
    attribute is the network's. Calls of other batch sizes, with a Python-number timestep, under
    autograd or in training mode run eager. A signature's first call runs eager (cold); its second is
    timed and, under ``TRACE_MAX_CALL_SECONDS``, traced. With ``make = False`` only the traces an
    earlier stage made are used, and a new signature runs eager. ``traced`` / ``eager`` count the signatures of each kind.
    """

    def __init__(self, network: nn.Module, batches: Iterable[int], make: bool = True) -> None:
        weight = next((p for p in network.parameters() if p.dim() == 4), None)  # the layout its stage put them in
        # which parameter objects a trace holds: a module swapped in since (a merged adapter) calls for a new one
        held = tuple(id(p) for p in network.parameters())
        self.__dict__.update(network=network, batches=frozenset(batches), traces=_TRACES.setdefault(network, {}),
                             weights=(_signature(weight), held), make=make, lock=threading.Lock())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["network"], name)

    @property
    def traced(self) -> int:
        return sum(t is not None and t is not _SEEN for t in self.traces.values())

    @property
    def eager(self) -> int:
        return sum(t is None for t in self.traces.values())

    def __call__(self, sample: Tensor, timestep: Any, class_labels: Optional[Tensor] = None,
                 return_dict: bool = True) -> Any:
        net = self.network
        if (sample.shape[0] not in self.batches or not torch.is_tensor(timestep) or torch.is_grad_enabled()
                or net.training):
            return net(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        kind = sample.device.type
        key = (_signature(sample), _signature(timestep), _signature(class_labels), torch.is_autocast_enabled(kind),
               torch.get_autocast_dtype(kind), self.weights)
        args = (sample, timestep) if class_labels is None else (sample, timestep, class_labels)
        trace = self.traces.get(key)
        if trace is None or trace is _SEEN:
            tic = time.perf_counter()
            out = net(sample, timestep, class_labels=class_labels, return_dict=False)[0]
            seconds = time.perf_counter() - tic
            if self.make and trace is _SEEN:
                with self.lock:  # lanes side by side (stages.sample.side_by_side): one thread traces
                    if self.traces.get(key) is _SEEN:
                        slow = seconds > TRACE_MAX_CALL_SECONDS
                        self.traces[key] = None if slow else _checked_trace(net, args, out)
            elif self.make:
                self.traces.setdefault(key, _SEEN)  # a new signature; one left eager (None) stays so
        else:
            with torch.jit.optimized_execution(False):  # the graph that was checked, without the profiling passes
                out = trace(*args)
        return VelocityOutput(out) if return_dict else (out,)


def _checked_trace(network: nn.Module, args: tuple[Tensor, ...], expected: Tensor) -> Any:
    """A trace of ``network`` on ``args`` whose output is bitwise ``expected``, else None."""
    try:
        with warnings.catch_warnings():  # TracerWarnings on shape arithmetic; torch.jit's own deprecation notice
            warnings.simplefilter("ignore")
            trace = torch.jit.trace(_Positional(network), args, check_trace=False)
            with torch.jit.optimized_execution(False):
                again = trace(*args)
    except Exception:  # noqa: BLE001 - a forward TorchScript cannot trace, or a torch without torch.jit, runs eager
        return None
    return trace if isinstance(again, Tensor) and torch.equal(again, expected) else None


def tf32_off(module: Any) -> int:
    """Rewrite ``module``'s TorchScript graphs (every ``ScriptModule`` in it, every method) so their convolutions
    never take TF32, whatever torch's flags say; the number of convolutions rewritten. Call it on a network just
    loaded, before anything runs it, inlines it into a caller or freezes it: those build an optimised copy of the
    graph that this edit does not reach.

    A ``torch.jit.trace`` records a convolution as ``aten::_convolution`` with cuDNN's ``allow_tf32`` flag of that
    moment as a constant argument (True under torch's defaults), so such a network, e.g. a saved Inception for
    FID, runs in TF32 on an Ampere or later GPU even inside ``io.host.ieee_float32``. A scripted convolution
    (``aten::conv2d``), or one saved before torch 1.7 (no such argument), reads the flag when it runs, which that
    block sets."""
    import torch

    def nodes(block: Any) -> Iterable[Any]:  # a graph's nodes, those inside if/loop blocks too
        for node in list(block.nodes()):
            yield node
            for inner in node.blocks():
                yield from nodes(inner)

    changed = 0
    for sub in module.modules():
        if not isinstance(sub, torch.jit.ScriptModule):
            continue
        for name in sub._c._method_names():
            graph = sub._c._get_method(name).graph
            for node in list(nodes(graph)):
                args = list(node.inputs())
                if node.kind() != "aten::_convolution" or len(args) != 13 or args[12].node().kind() != "prim::Constant":
                    continue
                if args[12].toIValue() is True:
                    off = graph.insertConstant(False)
                    off.node().moveBefore(node)
                    node.replaceInput(12, off)
                    changed += 1
    return changed
