"""SDXL: ``UNet2DConditionModel`` with ``addition_embed_type = "text_time"``.

Two CLIP encoders whose hidden states are concatenated, the second's pooled embedding, and six time
ids ``(H, W, 0, 0, H, W)`` (original size, crop corner, target size, in pixels) as
``StableDiffusionXLPipeline`` makes them for an uncropped image at the network's native size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ModelLoadError
from .base import Cond, Family, vae_scale_factor


class StableDiffusionXL(Family):
    name = "sdxl"
    network_class = "UNet2DConditionModel"
    reuses_cross_attention = True

    def accepts(self, config: dict[str, Any]) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def check_pipeline(self, pipeline: Any, config: dict[str, Any], source: str) -> None:
        """The refiner's network takes 5 time ids (an aesthetic score instead of the crop): diffusers'
        rule, ``addition_time_embed_dim * ids + pooled dim == projection_class_embeddings_input_dim``."""
        encoder = getattr(pipeline, "text_encoder_2", None)
        pooled = encoder.config.projection_dim if encoder is not None else None
        six = pooled is None or config.get("addition_time_embed_dim", 0) * 6 + pooled == config.get(
            "projection_class_embeddings_input_dim")
        if getattr(pipeline.config, "requires_aesthetics_score", False) or not six:
            raise ModelLoadError(f"{source} is an SDXL refiner (its network takes an aesthetic score, not SDXL's six "
                                 f"time ids); pgraft runs text-to-image SDXL base models: pass the base model")

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, cfg: bool,
                    shape: tuple[int, int, int]) -> Cond:
        pe, npe, pooled, npooled = pipeline.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=cfg)
        h, w = (n * vae_scale_factor(pipeline.vae) for n in shape[1:])
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pe.dtype, device=device).expand(len(prompts), 6)
        return Cond(prompt_embeds=pe, negative_prompt_embeds=npe, pooled=pooled, negative_pooled=npooled,
                    extra={"time_ids": time_ids})

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return network(x, timestep, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample


FAMILY = StableDiffusionXL()
