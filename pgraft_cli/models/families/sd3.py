"""SD3 / SD3.5: ``SD3Transformer2DModel`` on CLIP (+ optional T5) states and pooled CLIP embeddings."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import Cond, Family


class StableDiffusion3(Family):
    name = "sd3"
    network_class = "SD3Transformer2DModel"

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, cfg: bool,
                    shape: tuple[int, int, int]) -> Cond:
        pe, npe, pooled, npooled = pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        return Cond(prompt_embeds=pe, negative_prompt_embeds=npe, pooled=pooled, negative_pooled=npooled)

    def pooled_text(self, pipeline: Any, prompts: list[str], device: torch.device,
                    shape: tuple[int, int, int]) -> Optional[Tensor]:
        """CLIP-L's and CLIP-G's pooled outputs side by side, as ``encode_prompt`` joins them; T5 is not run."""
        return torch.cat([pipeline._get_clip_prompt_embeds(prompts, device=device, clip_model_index=i)[1]
                          for i in (0, 1)], dim=-1)

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return network(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled).sample


FAMILY = StableDiffusion3()
