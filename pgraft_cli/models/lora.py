"""pgraft's LoRA adapter (peft): inject it, read and load its weights, switch it on and off."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..errors import PgraftError

LORA_ADAPTER = "pgraft"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "time_emb_proj"]


def add_lora(network: nn.Module, rank: int, alpha: float, targets: Optional[list[str]] = None) -> list[str]:
    """Inject pgraft's LoRA adapter (peft; B = 0, so it starts as the identity); returns its targets.

    By default it targets every attention projection, resnet convolution and time projection the
    network has (``LORA_TARGETS``).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PgraftError("finetune.lora_rank > 0 needs peft: pip install 'pgraft[lora]' (or pip install peft)") from None
    names = [n for n, _ in network.named_modules()]
    wanted = targets or [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    if not wanted:
        raise PgraftError(f"no LoRA target layers ({', '.join(LORA_TARGETS)}) in this network; use finetune.lora_rank = 0")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=wanted, init_lora_weights=True)
    inject_adapter_in_model(config, network, adapter_name=LORA_ADAPTER)
    return wanted


def lora_state(network: nn.Module) -> dict[str, Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(network, adapter_name=LORA_ADAPTER)


def set_lora_state(network: nn.Module, state: dict[str, Tensor], source: str = "the LoRA adapter") -> None:
    """Load adapter weights; refuses a state that lacks some of the adapter's tensors.

    peft would leave those layers at their initial values (B = 0: the base layer), silently.
    """
    from peft.utils import set_peft_model_state_dict

    expected = lora_state(network)
    absent = [k for k in expected if k not in state]
    if absent:
        raise PgraftError(f"{source} lacks {len(absent)} of the adapter's {len(expected)} tensors (e.g. '{absent[0]}'), "
                          f"which would load as zeros; pass the complete adapter file pgraft finetune wrote")
    result = set_peft_model_state_dict(network, state, adapter_name=LORA_ADAPTER)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise PgraftError(f"the LoRA adapter does not fit this model ({missing[0]}); pass the base it was trained on")


def set_lora_enabled(network: nn.Module, on: bool) -> None:
    """Switch every peft LoRA layer of ``network`` on or off (a disabled layer is the base layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in network.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(on)


# Layers whose calls autocast runs in its lower dtype, casting input, weight and bias alike.
AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
TIE = 1 << 15  # the one difference int16 cannot hold (it wraps to -TIE); its few places are listed


def split_bf16(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A float32 tensor as ``(high, low, ties)``: ``high = bf16(x)`` (rounded to nearest, as autocast
    casts) and the rest of its bits, so that :func:`join_bf16` gives ``x`` back bit for bit, except NaN
    payloads (the bf16 cast canonicalises a NaN's payload and sign; it comes back a NaN).

    On the float32 bit patterns read as int32, ``bits(x) = bits(high) << 16 + d`` with
    ``d in [-2^15, 2^15]`` (rounding moves the upper half by at most one). ``low`` is ``d`` as int16
    (``+2^15``, a tie rounded down to even, wraps to ``-2^15``) and ``ties`` the flat indices where
    ``d = +2^15``: 2 bytes per value instead of a 4-byte float32 copy.
    """
    high = x.to(torch.bfloat16)
    d = x.view(torch.int32) - (high.view(torch.int16).to(torch.int32) << 16)
    ties = (d.flatten() == TIE).nonzero().flatten()
    return high, d.to(torch.int16), ties


def join_bf16(high: Tensor, low: Tensor, ties: Tensor) -> Tensor:
    """The float32 tensor :func:`split_bf16` split: ``bits = bits(high) << 16 + d`` (``d = +2^15`` at ``ties``)."""
    d = low.to(torch.int32).flatten()  # row-major, as split_bf16 listed the ties (a strided weight's too)
    d[ties] = TIE
    d = d.view(low.shape)
    return ((high.view(torch.int16).to(torch.int32) << 16) + d).view(torch.float32)


@contextlib.contextmanager
def frozen_layers_in(network: nn.Module, dtype: Optional[torch.dtype], host: str = "cpu") -> Iterator[list[Tensor]]:
    """While an adapter trains under autocast to ``dtype``: the frozen weights and biases of the
    linear and convolution layers held in ``dtype``; on exit they are their float32 selves again, bit
    for bit. Yields the host tensors it keeps for that.

    Autocast casts these layers' weights and biases to ``dtype`` on every call, so the passes
    compute the same bits; what goes is a cast per layer and call, and the cast copies saved for the
    backward pass (the frozen weights take half the memory, as in diffusers' LoRA training scripts).
    What is kept to give the float32 weights back:

    - weights on the ``host`` device (the CPU): their own storage, no copy. It is often the weight
      file's memory map (clean pages the OS can drop); splitting it measured worse there (bench/RESULTS.md,
      "LoRA memory"): the new bf16 and low-bit tensors and the float32 ones made at the end are
      anonymous memory, while the map stays for the layers left in float32.
    - bf16 on a GPU: only the bits bf16 drops (:func:`split_bf16`, int16), on the host: 2 bytes a
      frozen weight per process instead of a 4-byte float32 copy.
    - fp16 on a GPU (not a truncation of float32): the float32 originals on the host, 4 bytes a weight.

    The layer holding the network's first parameter stays float32: ``ModelMixin.dtype`` reads it.
    """
    if dtype is None:
        yield []
        return
    first = next(network.parameters(), None)
    kept: list[tuple[nn.Parameter, tuple[Tensor, ...]]] = []
    for module in network.modules():
        if not isinstance(module, AUTOCAST_LAYERS) or any(p is first for p in module.parameters(recurse=False)):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad or p.dtype != torch.float32:
                continue
            if p.device.type == host:
                kept.append((p, (p.data,)))
                p.data = p.data.to(dtype)
            elif dtype == torch.bfloat16:
                high, low, ties = split_bf16(p.data)
                kept.append((p, (low.to("cpu"), ties.to("cpu"))))
                p.data = high
            else:
                kept.append((p, (p.data.to("cpu"),)))
                p.data = p.data.to(dtype)
    try:
        yield [t for _, held in kept for t in held]
    finally:
        for p, held in kept:
            p.data = (join_bf16(p.data, *(t.to(p.device) for t in held)) if len(held) == 2
                      else held[0].to(p.device))
