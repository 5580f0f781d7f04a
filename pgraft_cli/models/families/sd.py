"""Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` on CLIP text states, no added embeddings."""

from __future__ import annotations

from typing import Any

from ...errors import ModelLoadError
from .base import Family


class StableDiffusion(Family):
    name = "sd"
    network_class = "UNet2DConditionModel"

    def accepts(self, config: dict[str, Any]) -> bool:
        return not config.get("addition_embed_type")

    def conditioning(self, config: dict[str, Any]):
        if config.get("class_embed_type") or config.get("num_class_embeds"):
            raise ModelLoadError(
                "this UNet2DConditionModel takes extra conditioning (class_embed_type/num_class_embeds, as upscalers "
                "do), which pgraft does not support; use SD 1.x/2.x, SDXL, SD3, Flux, PixArt, DiT or a UNet2DModel")
        return "text", None, None


FAMILY = StableDiffusion()
