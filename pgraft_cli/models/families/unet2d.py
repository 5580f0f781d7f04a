"""Pixel-space ``UNet2DModel``: unconditional, or class-conditional through ``num_class_embeds``.

A class model trained with label dropout names its null class in the file's metadata
(``pgraft.null_class``, read by the loader); that enables classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...errors import ModelLoadError
from .base import Cond, Family


class UNet2D(Family):
    name = "unet2d"
    network_class = "UNet2DModel"

    def conditioning(self, config: dict[str, Any]):
        if config.get("class_embed_type") or config.get("addition_embed_type"):
            raise ModelLoadError(
                f"this UNet2DModel takes extra conditioning (class_embed_type={config.get('class_embed_type')!r}), "
                f"which pgraft does not support; use an unconditional UNet2DModel or one with num_class_embeds")
        if config.get("num_class_embeds"):
            return "class", int(config["num_class_embeds"]), None
        return "none", None, None

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return network(x, timestep, class_labels=cond.class_labels).sample


FAMILY = UNet2D()
