"""PixArt-alpha / PixArt-sigma: ``PixArtTransformer2DModel`` on T5 states, with learned sigma.

The prompt's attention mask is a network input (and the empty negative prompt's under guidance);
1024-px PixArt-alpha (``sample_size`` 128) also takes the image's resolution and aspect ratio, as
``PixArtAlphaPipeline`` passes them. Prompts are encoded uncleaned, at the pipeline's own
``max_sequence_length`` (120 for alpha, 300 for sigma).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .base import Cond, Family, vae_scale_factor


class PixArt(Family):
    name = "pixart"
    network_class = "PixArtTransformer2DModel"

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, cfg: bool,
                    shape: tuple[int, int, int]) -> Cond:
        length = inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default
        pe, mask, npe, nmask = pipeline.encode_prompt(prompts, do_classifier_free_guidance=cfg, device=device,
                                                      clean_caption=False, max_sequence_length=length)
        cond = Cond(prompt_embeds=pe, negative_prompt_embeds=npe, extra={"mask": mask},
                    negative_extra={"mask": nmask} if cfg else {})
        if pipeline.transformer.config.sample_size == 128:  # the pipeline's micro-conditions
            h, w = (n * vae_scale_factor(pipeline.vae) for n in shape[1:])
            rows = len(prompts)
            cond.extra["resolution"] = torch.tensor([[h, w]], dtype=pe.dtype, device=device).expand(rows, 2)
            cond.extra["aspect_ratio"] = torch.tensor([[h / w]], dtype=pe.dtype, device=device).expand(rows, 1)
        return cond

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        added = {"resolution": cond.extra.get("resolution"), "aspect_ratio": cond.extra.get("aspect_ratio")}
        return network(x, encoder_hidden_states=cond.prompt_embeds, encoder_attention_mask=cond.extra["mask"],
                       timestep=timestep, added_cond_kwargs=added).sample


FAMILY = PixArt()
