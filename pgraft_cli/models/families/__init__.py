"""The model families pgraft runs, one adapter module per family, found by network class.

Adding a family is adding one module with a ``FAMILY`` adapter (see ``base.Family``) to
``_MODULES`` and its parity test against the family's diffusers pipeline.
"""

from __future__ import annotations

from typing import Any

from ...errors import ModelLoadError
from . import dit, flux, pixart, sd, sd3, sdxl, unet2d
from .base import Cond, Conditioning, Family

_MODULES = (unet2d, sd, sdxl, sd3, flux, pixart, dit)
FAMILIES: dict[str, list[Family]] = {}
for _module in _MODULES:
    FAMILIES.setdefault(_module.FAMILY.network_class, []).append(_module.FAMILY)
SUPPORTED_CLASSES = tuple(FAMILIES)

__all__ = ["Cond", "Conditioning", "Family", "FAMILIES", "SUPPORTED_CLASSES", "family_for", "import_network_code",
           "unsupported"]


def unsupported(model_class: str) -> ModelLoadError:
    """The one error line for a network class no family adapter runs."""
    return ModelLoadError(f"model class '{model_class}' is not supported; pgraft loads {', '.join(SUPPORTED_CLASSES)}")


def family_for(model_class: str, config: dict[str, Any]) -> Family:
    """The adapter for a network of ``model_class`` with ``config``; one error line when there is none."""
    candidates = FAMILIES.get(model_class)
    if not candidates:
        raise unsupported(model_class)
    for family in candidates:
        if family.accepts(config):
            return family
    raise ModelLoadError(
        f"this {model_class} takes extra conditioning (addition_embed_type={config.get('addition_embed_type')!r}), "
        f"which pgraft does not support; pgraft runs {', '.join(f.name for f in candidates)} {model_class}s")


def import_network_code() -> None:
    """Import the diffusers code every family's network is built from: each supported class through
    diffusers' public names (as loading resolves it), which imports ``models.modeling_utils`` (and what it
    pulls in: torch._dynamo, peft, transformers' quantization configs, scipy) and the ``models.unets`` and
    ``models.transformers`` packages. Loading any model imports them; importing them first, before any
    weights are read, lets the caller hold the garbage collector for the imports alone
    (``io.host.gc_paused``). Only a speed-up: a class diffusers lacks is left for the load to report."""
    try:
        import diffusers
    except ImportError:
        return
    for name in SUPPORTED_CLASSES:
        try:
            getattr(diffusers, name)
        except (ImportError, AttributeError, RuntimeError):
            continue
