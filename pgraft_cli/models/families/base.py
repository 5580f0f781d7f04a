"""What every family adapter does, with the defaults most families share.

An adapter knows one kind of diffusers network: which conditioning it takes, the shape of a sample
in pgraft's model space, how to encode prompts with its pipeline's text encoders, how to call the
network at a timestep (``t * T``, diffusers' count), and how model space maps to images through the
VAE. Classifier-free guidance and the schedule stay in ``LoadedModel.predict`` and ``core``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from ..cross_attention import tensor_version

Conditioning = Literal["none", "class", "text"]


@dataclass
class Cond:
    """Per-batch conditioning: class labels, or encoded prompts with the unconditional half.

    ``extra`` holds further per-row network inputs (SDXL's time ids, PixArt's attention mask) and
    ``negative_extra`` their unconditional rows where those differ; ``distilled_guidance`` is the
    guidance a guidance-distilled network (Flux dev) takes as an input instead of two calls.
    """

    class_labels: Optional[Tensor] = None
    prompt_embeds: Optional[Tensor] = None
    negative_prompt_embeds: Optional[Tensor] = None
    pooled: Optional[Tensor] = None
    negative_pooled: Optional[Tensor] = None
    guidance_scale: float = 1.0
    extra: dict[str, Tensor] = field(default_factory=dict)
    negative_extra: dict[str, Tensor] = field(default_factory=dict)
    distilled_guidance: Optional[float] = None
    # guided_batch's last batch and what it was made from: a sampler's steps get the same tensors
    # (models.cross_attention reuses a projection's output for the very same input object)
    _guided: Optional[tuple[tuple, "Cond", list[int], tuple]] = field(default=None, repr=False, compare=False)
    _structure_skip = ("_guided",)  # a memo: not part of what core.metrics.structure describes

    def tensors(self) -> list[Tensor]:
        """Every tensor the conditioning holds (its fields and its ``extra`` inputs)."""
        values = [self.class_labels, self.prompt_embeds, self.negative_prompt_embeds, self.pooled,
                  self.negative_pooled, *self.extra.values(), *self.negative_extra.values()]
        return [v for v in values if isinstance(v, Tensor)]

    def rows(self, index: Tensor) -> "Cond":
        """The conditioning of rows ``index`` of the batch (every per-row input indexed alike)."""
        def pick(v: Optional[Tensor]) -> Optional[Tensor]:
            return None if v is None else v[index.to(v.device)]

        return Cond(pick(self.class_labels), pick(self.prompt_embeds), pick(self.negative_prompt_embeds),
                    pick(self.pooled), pick(self.negative_pooled), self.guidance_scale,
                    {k: pick(v) for k, v in self.extra.items()}, {k: pick(v) for k, v in self.negative_extra.items()},
                    self.distilled_guidance)

    @staticmethod
    def gather(parts: list["Cond"], which: list[int]) -> "Cond":
        """The batch whose row r is ``parts[which[r]]``'s (each part: one prompt encoded alone); the
        unconditional rows are ``parts[0]``'s repeated (the empty negative prompt, the same for all)."""
        first, index = parts[0], torch.tensor(which)

        def pos(get: Any) -> Optional[Tensor]:
            rows = [get(c) for c in parts]
            return None if rows[0] is None else torch.cat(rows)[index.to(rows[0].device)]

        def neg(v: Optional[Tensor]) -> Optional[Tensor]:
            return None if v is None else v.expand(len(which), *v.shape[1:])

        return Cond(None, pos(lambda c: c.prompt_embeds), neg(first.negative_prompt_embeds),
                    pos(lambda c: c.pooled), neg(first.negative_pooled), first.guidance_scale,
                    {k: pos(lambda c, k=k: c.extra[k]) for k in first.extra},
                    {k: neg(v) for k, v in first.negative_extra.items()}, first.distilled_guidance)

    def guided_batch(self, null_class: Optional[int]) -> "Cond":
        """The batch ``[unconditional; conditional]`` of one guided call (null class or negative prompt first);
        the same object again while this conditioning's tensors are the same objects, not written since
        (an inference tensor keeps no version counter: its identity alone)."""
        sources = self.tensors()
        if any(v.requires_grad for v in sources):  # a graph of its own at every call (training a projection)
            return self._make_guided_batch(null_class)
        made_of = (null_class, self.distilled_guidance, torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
                   *((id(v), tensor_version(v)) for v in sources))
        if self._guided is not None and self._guided[0] == made_of:
            _, batch, versions, _ = self._guided
            if [tensor_version(v) for v in batch.tensors()] == versions:  # nothing wrote into the batch since
                return batch
        batch = self._make_guided_batch(null_class)
        # the sources held: no id in the key is reused while it is kept
        self._guided = (made_of, batch, [tensor_version(v) for v in batch.tensors()], tuple(sources))
        return batch

    def _make_guided_batch(self, null_class: Optional[int]) -> "Cond":
        def both(neg: Optional[Tensor], pos: Optional[Tensor]) -> Optional[Tensor]:
            return None if pos is None else torch.cat([pos if neg is None else neg, pos])

        labels = None
        if self.class_labels is not None:
            assert null_class is not None
            labels = torch.cat([torch.full_like(self.class_labels, null_class), self.class_labels])
        return Cond(class_labels=labels, prompt_embeds=both(self.negative_prompt_embeds, self.prompt_embeds),
                    pooled=both(self.negative_pooled, self.pooled),
                    extra={k: both(self.negative_extra.get(k), v) for k, v in self.extra.items()},
                    distilled_guidance=self.distilled_guidance)


def vae_scale_factor(vae: Any) -> int:
    """How many image pixels one latent pixel spans: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextlib.contextmanager
def vae_precision(vae: Any) -> Iterator[torch.dtype]:
    """The dtype the VAE runs in: a float16 VAE whose config sets ``force_upcast`` (SDXL's, which
    overflows in float16: black images) runs in float32 for the call and goes back to float16
    afterwards, as diffusers' pipelines ``upcast_vae``."""
    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)


class Family:
    """A network family: pixel or latent, unconditional, class- or text-conditional.

    Subclasses set ``name`` and ``network_class`` and override what differs; the defaults are those
    of a diffusers network called as ``network(x, timestep, ...).sample`` on an unpacked latent.
    """

    name = ""
    network_class = ""
    # False for guidance-distilled networks, which take the guidance as an input (Flux dev)
    classifier_free = True
    # True where the network's cross-attention reads the prompt's states as given (SD, SDXL), so a
    # sampler's steps can reuse their keys and values (models.cross_attention); a network that
    # projects its text states inside the forward first (PixArt) gets new inputs every call
    reuses_cross_attention = False

    def accepts(self, config: dict[str, Any]) -> bool:
        """Whether a network of ``network_class`` with this config belongs to this family."""
        return True

    def check_pipeline(self, pipeline: Any, config: dict[str, Any], source: str) -> None:
        """Refuse (one ``ModelLoadError`` line) a pipeline this family's network (``config``) cannot run from."""

    def conditioning(self, config: dict[str, Any]) -> tuple[Conditioning, Optional[int], Optional[int]]:
        """``(conditioning, number of class embeddings, built-in null class)``."""
        return "text", None, None

    def sample_shape(self, config: dict[str, Any], vae: Any) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample in model space (the network's native size)."""
        size = config.get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.get("in_channels", 4)), int(h), int(w))

    def image_seq_len(self, config: dict[str, Any], shape: tuple[int, int, int]) -> int:
        """Tokens the network sees for one sample (sets the shift of dynamically shifted flows)."""
        patch = int(config.get("patch_size") or 1)
        return (shape[1] // patch) * (shape[2] // patch)

    def encode_text(self, pipeline: Any, prompts: list[str], device: torch.device, cfg: bool,
                    shape: tuple[int, int, int]) -> Cond:
        """Prompts encoded by the pipeline's text encoders (and the empty negative prompt under ``cfg``)."""
        pe, npe = pipeline.encode_prompt(prompts, device, 1, cfg)
        return Cond(prompt_embeds=pe, negative_prompt_embeds=npe)

    def pooled_text(self, pipeline: Any, prompts: list[str], device: torch.device,
                    shape: tuple[int, int, int]) -> Optional[Tensor]:
        """Each prompt's pooled text embedding (B, E), the text-conditioned corrector's input: the pooled
        output the family's network takes (SDXL, SD3, Flux), or None where it has none."""
        return self.encode_text(pipeline, prompts, device, False, shape).pooled

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        """The network's prediction for model-space ``x`` (B, C, H, W) at ``timestep`` (B,), ``t * T``."""
        return network(x, timestep, encoder_hidden_states=cond.prompt_embeds).sample

    # -- model space <-> images (latents: ``z = (vae_latent - shift) * scale``) ------------------
    def decode(self, vae: Any, x: Tensor) -> Tensor:
        """Model-space samples to images in [-1, 1]: ``vae.decode(z / scale + shift)``."""
        if vae is None:
            return x
        cfg = vae.config
        latents = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with vae_precision(vae) as dtype:
            return vae.decode(latents.to(dtype)).sample

    def encode_images(self, vae: Any, x: Tensor) -> Tensor:
        """Images in [-1, 1] to model space: ``(mean of vae.encode(x) - shift) * scale``."""
        if vae is None:
            return x
        cfg = vae.config
        with vae_precision(vae) as dtype:
            latents = vae.encode(x.to(dtype)).latent_dist.mean
        return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
