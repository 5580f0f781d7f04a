"""Flux.1 (dev and schnell): ``FluxTransformer2DModel`` on packed 2x2 latent patches.

pgraft's model space is the unpacked latent (C, H, W); each call packs it into (H/2 W/2) tokens of
4C channels with image position ids ``(0, row, col)``, and unpacks the prediction, exactly as
``FluxPipeline`` does. Text: T5 states (text position ids 0) and the CLIP pooled embedding.
Guidance-distilled networks (dev, ``guidance_embeds``) take the guidance as an input
(``sample.distilled_guidance``), so they make one call per step and no classifier-free guidance.
Timesteps go in as ``t`` in [0, 1] (the pipeline's ``timestep / 1000``). The sample size is the
VAE's native image size; the flow shift is the scheduler's dynamic shift at that token count.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import Cond, Family, vae_scale_factor

DEFAULT_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): row-major 2x2 patches, channel-major inside a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack` for an (H, W) latent."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids ``(0, row, col)`` of the (H/2, W/2) patch grid, one row per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(Family):
    name = "flux"
    network_class = "FluxTransformer2DModel"
    classifier_free = False

    def sample_shape(self, config: dict[str, Any], vae: Any) -> tuple[int, int, int]:
        size = vae.config.sample_size if vae is not None else 1024
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        factor = vae_scale_factor(vae) if vae is not None else 8
        return (int(config.get("in_channels", 64)) // 4, 2 * (int(h) // (factor * 2)), 2 * (int(w) // (factor * 2)))

    def image_seq_len(self, config: dict[str, Any], shape: tuple[int, int, int]) -> int:
        return (shape[1] // 2) * (shape[2] // 2)

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, cfg: bool,
                    shape: tuple[int, int, int]) -> Cond:
        length = inspect.signature(pipeline.__call__).parameters["max_sequence_length"].default
        pe, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=length)
        return Cond(prompt_embeds=pe, pooled=pooled)

    def pooled_text(self, pipeline: Any, prompts: list[str], device: torch.device,
                    shape: tuple[int, int, int]) -> Optional[Tensor]:
        """CLIP's pooled output, as ``encode_prompt`` computes it; T5 is not run."""
        return pipeline._get_clip_prompt_embeds(prompts, device=device)

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x.shape
        guidance = None
        if network.config.guidance_embeds:
            value = cond.distilled_guidance if cond.distilled_guidance is not None else DEFAULT_DISTILLED_GUIDANCE
            guidance = torch.full((b,), value, device=x.device, dtype=torch.float32)
        embeds = cond.prompt_embeds
        out = network(hidden_states=pack(x), timestep=timestep / 1000, guidance=guidance,
                      pooled_projections=cond.pooled, encoder_hidden_states=embeds,
                      txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                      img_ids=image_ids(h, w, x.device, x.dtype)).sample
        return unpack(out, h, w)


FAMILY = Flux()
