"""Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` on CLIP text states, no added embeddings."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ...errors import ModelLoadError
from .base import Family


class StableDiffusion(Family):
    name = "sd"
    network_class = "UNet2DConditionModel"
    reuses_cross_attention = True

    def accepts(self, config: dict[str, Any]) -> bool:
        return not config.get("addition_embed_type")

    def conditioning(self, config: dict[str, Any]):
        if config.get("class_embed_type") or config.get("num_class_embeds"):
            raise ModelLoadError(
                "this UNet2DConditionModel takes extra conditioning (class_embed_type/num_class_embeds, as upscalers "
                "do), which pgraft does not support; use SD 1.x/2.x, SDXL, SD3, Flux, PixArt, DiT or a UNet2DModel")
        return "text", None, None

    def pooled_text(self, pipeline: Any, prompts: list[str], device: torch.device,
                    shape: tuple[int, int, int]) -> Optional[Tensor]:
        """The CLIP text encoder's pooled output (the end-of-text token's final state), which the
        UNet never reads but which summarises the prompt."""
        tok = pipeline.tokenizer(prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
        return pipeline.text_encoder(tok.input_ids.to(device)).pooler_output


FAMILY = StableDiffusion()
