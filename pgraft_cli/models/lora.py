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


@contextlib.contextmanager
def frozen_layers_in(network: nn.Module, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """While an adapter trains under autocast to ``dtype``: the frozen weights and biases of the
    linear and convolution layers held in ``dtype``, their float32 originals on the CPU until exit.

    Autocast casts these layers' weights and biases to ``dtype`` on every call, so the passes
    compute the same bits; what goes is a cast per layer and call, and the cast copies saved for the
    backward pass (the frozen weights take half the memory, as in diffusers' LoRA training scripts).
    The layer holding the network's first parameter stays float32: ``ModelMixin.dtype`` reads it.
    """
    if dtype is None:
        yield
        return
    first = next(network.parameters(), None)
    originals: list[tuple[nn.Parameter, Tensor]] = []
    for module in network.modules():
        if not isinstance(module, AUTOCAST_LAYERS) or any(p is first for p in module.parameters(recurse=False)):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.dtype == torch.float32:
                originals.append((p, p.data.to("cpu")))
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in originals:
            p.data = data.to(p.device)
