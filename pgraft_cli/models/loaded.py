"""A loaded model: the diffusers network, its noise schedule, its conditioning and its decoder.

pgraft does not wrap diffusers in a second hierarchy. :class:`LoadedModel` only records what the
sampler needs to call a diffusers network in pgraft's time convention (see ``samplers.py``):
``predict(x, t, cond)`` returns the network's native prediction, with classifier-free guidance for
text models and for class-conditional models trained with a null class (``guided``), and ``decode``
turns a final model-space sample into images in [0, 1].

Guidance and fine-tunes (docs/guidance.md): kept samples are drawn with guidance and the tuned
network learns their distribution on its conditional branch, so ``tuned_guidance = "none"`` runs the
tuned segment above the cutoff unguided (one call per step); ``"reapply"`` guides it again.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..core.samplers import NoiseSchedule, above_cutoff
from ..errors import PgraftError
from .corrector import NoiseCorrector, precision_label
from .families import Cond, Conditioning, Family, family_for
from .lora import lora_state, set_lora_enabled

__all__ = ["Cond", "Conditioning", "LoadedModel", "PromptCache", "base_only", "tuned_identity"]
VAE_SLICE_ABOVE = 512 * 512  # pixels per image above which the VAE decodes a batch image by image
VAE_TILE_ABOVE = 1024 * 1024  # and above which it decodes in overlapping tiles (diffusers' tiling)


def align_weights(module: Optional[nn.Module], alignment: int = 64) -> None:
    """Give every parameter of ``module`` whose data is not ``alignment``-byte aligned its own aligned copy.

    A text encoder runs one prompt at a time (``LoadedModel.encode``), and the CPU's matrix-vector
    kernels round differently with the weights' alignment: a folder's safetensors memory map places a
    tensor at any 4-byte offset, a single file's converted weights are freshly allocated, so the same
    prompt's pooled embedding differed in its last bits between the two. Aligned copies make a prompt's
    encoding depend on the weights' values only. Done on the CPU only (a GPU copy is aligned anyway),
    at the first encoding, so a run that moves its encoders to a GPU never copies them on the host.
    """
    if module is None:
        return
    for param in module.parameters():
        if param.data_ptr() % alignment:
            param.data = param.data.clone()


@dataclass
class LoadedModel:
    """Everything pgraft knows about one model after loading it."""

    network: nn.Module
    schedule: NoiseSchedule
    model_class: str
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    conditioning: Conditioning
    sample_shape: tuple[int, int, int]
    source: str
    source_kind: str
    identity: str
    num_classes: Optional[int] = None
    pipeline: Any = None  # the diffusers pipeline (text encoders, VAE) when MODEL is one
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    default_data: Optional[str] = None
    default_eval_data: Optional[str] = None  # held-out data FID is also measured against (pgraft.eval_data)
    corrector: Optional[NoiseCorrector] = None  # applied to the initial noise, if any
    base_identity: Optional[str] = None  # with a corrector or a fine-tune: the base model's own identity
    # A fine-tune (finetune.py): the tuned network runs t in (cutoff, 1], the base [0, cutoff].
    # Full fine-tuning keeps both networks (``tuned`` and ``network``); LoRA keeps one network
    # whose adapter is switched on above the cutoff and off below it.
    tuned: Optional[nn.Module] = None
    lora: bool = False
    cutoff: float = 0.0
    # How the tuned segment is guided (FinetuneConfig.tuned_guidance); files without it: "reapply".
    tuned_guidance: str = "reapply"
    # A class-conditional UNet trained with label dropout: the class index that means "no class"
    # (file metadata ``pgraft.null_class``); it enables classifier-free guidance for class models.
    null_class: Optional[int] = None
    # Sampling under autocast to this dtype (model.autocast: bf16 on GPUs), float32 weights kept.
    autocast: Optional[torch.dtype] = None
    config_dir: Optional[str] = None  # the --config a single-file checkpoint or bare weights were loaded with

    # -- description ----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """How the network samples: its weights' dtype and its autocast (``corrector.precision_label``)."""
        return precision_label(self.dtype, self.autocast)

    @property
    def finetuned(self) -> bool:
        """A composed fine-tune: a tuned network or a LoRA adapter above the cutoff."""
        return self.tuned is not None or self.lora

    @property
    def guided(self) -> bool:
        """Whether ``guidance_scale`` applies: text models, and class models with a null class."""
        if not self.adapter.classifier_free:
            return False
        return self.conditioning == "text" or (self.conditioning == "class" and self.null_class is not None)

    @property
    def distilled(self) -> bool:
        """Whether the network takes a distilled guidance as an input (Flux dev: ``sample.distilled_guidance``)."""
        return bool(self.model_config.get("guidance_embeds"))

    @property
    def adapter(self) -> Family:
        """The family adapter that encodes, calls and decodes this network (``models/families``)."""
        return family_for(self.model_class, self.model_config)

    @property
    def family(self) -> str:
        return self.schedule.family

    @property
    def vae(self) -> Any:
        return getattr(self.pipeline, "vae", None) if self.pipeline is not None else None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if not self.latent:
            return self.sample_shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, h, w = self.sample_shape
        return (self.vae.config.out_channels, h * factor, w * factor)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    @property
    def base_runs(self) -> bool:
        """Whether sampling ever calls the base network: not under a full fine-tune at cutoff 0."""
        return self.tuned is None or self.cutoff > 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device the model runs on (the base may wait on the CPU: see ``base_runs``)."""
        return next((self.network if self.tuned is None else self.tuned).parameters()).device

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "LoadedModel":
        from diffusers.utils import logging as diffusers_logging

        if dtype == self.dtype:
            dtype = None  # no cast: diffusers warns on casts it cannot see through
        # diffusers warns on every cast that it cannot see which modules to keep in float32; pgraft
        # casts the whole model on purpose (model.dtype), so the warning is noise on stderr
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            for net, where in ((self.network, device if self.base_runs else "cpu"), (self.tuned, device)):
                if net is not None:
                    net.to(device=where, **({"dtype": dtype} if dtype is not None else {}))
            if self.pipeline is not None:
                self.pipeline.to(device, dtype) if dtype is not None else self.pipeline.to(device)
        finally:
            diffusers_logging.set_verbosity(level)
        return self

    # -- conditioning ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Optional[list[str]], class_labels: Optional[list[int]],
               guidance_scale: float, distilled_guidance: Optional[float] = None,
               cache: Optional["PromptCache"] = None) -> Cond:
        """Conditioning for a batch: class labels, or prompts encoded by the pipeline's encoders.

        ``distilled_guidance`` is the guidance input of a guidance-distilled network (Flux dev).
        Each distinct prompt goes through the text encoders once and alone, and its rows are repeated
        (as diffusers' pipeline does for one prompt and ``num_images_per_prompt``); the empty negative
        prompt is encoded once. A row's conditioning is thus its prompt's alone, whatever else shares
        the batch: a pooled projection's (rows, width) matmul (SDXL, SD3) changes its last bits with
        the number of rows on the CPU, so encoding several prompts together would not be. So ``cache``
        (a fine-tune's, whose text encoders stay frozen) can hand back a prompt's earlier encoding.
        """
        device = self.device
        if self.conditioning == "class":
            assert class_labels is not None
            return Cond(class_labels=torch.tensor(class_labels, device=device, dtype=torch.long),
                        guidance_scale=guidance_scale if self.null_class is not None else 1.0)
        if self.conditioning != "text":
            return Cond()
        assert prompts is not None and self.pipeline is not None
        unique, which = distinct(prompts)
        cfg = self.guided and guidance_scale > 1.0
        keys = [(p, cfg and k == 0) for k, p in enumerate(unique)]
        if cache is None or any(key not in cache.parts for key in keys):  # (a walk over the encoders' weights)
            self._align_text_encoders()

        def part(p: str, negative: bool) -> Cond:
            return self.adapter.encode_text(self.pipeline, [p], device, negative, self.sample_shape)

        cond = Cond.gather([part(*key) if cache is None else cache.get(key, lambda key=key: part(*key))
                            for key in keys], which)
        cond.guidance_scale, cond.distilled_guidance = guidance_scale, distilled_guidance
        return cond

    @torch.no_grad()
    def pooled_text(self, prompts: list[str]) -> Tensor:
        """Each prompt's pooled text embedding (``Family.pooled_text``): the text corrector's input,
        each distinct prompt encoded alone (as in ``encode``, so a row never depends on its batch)."""
        self._align_text_encoders()
        unique, which = distinct(prompts)
        parts = [self.adapter.pooled_text(self.pipeline, [p], self.device, self.sample_shape) for p in unique]
        pooled = None if parts[0] is None else torch.cat(parts)[torch.tensor(which, device=parts[0].device)]
        if pooled is None:
            raise PgraftError(f"{self.source} ({self.family}) has no pooled text embedding for a text-conditioned "
                              f"corrector; SD 1.x/2.x, SDXL, SD3 and Flux have one")
        return pooled.float()

    def _align_text_encoders(self) -> None:
        """On the CPU, give the text encoders' weights 64-byte aligned storage (``align_weights``), once."""
        if self.device.type == "cpu":
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                align_weights(getattr(self.pipeline, name, None))

    # -- the network in pgraft's convention -----------------------------------------------------
    def network_at(self, t: Tensor) -> nn.Module:
        """The network that runs at time t: the tuned one above the cutoff, else the base.

        With a LoRA fine-tune this switches the adapter on (t > cutoff) or off (t <= cutoff).
        """
        above = bool(torch.all(above_cutoff(t, self.cutoff)))
        if self.tuned is not None:
            return self.tuned if above else self.network
        if self.lora:
            set_lora_enabled(self.network, above)
        return self.network

    def _call(self, x: Tensor, timestep: Tensor, cond: Cond, network: nn.Module) -> Tensor:
        out = self.adapter.call(network, x, timestep, cond)
        # Learned-variance networks predict (mean, variance) stacked on channels; keep the mean part.
        return out[:, : x.shape[1]]

    def guidance_at(self, t: Tensor, cond: Cond) -> float:
        """The guidance scale at time t: ``cond.guidance_scale``, except 1 (the conditional branch
        alone) on the tuned segment ``t > cutoff`` of a fine-tune with ``tuned_guidance = "none"``."""
        if self.finetuned and self.tuned_guidance == "none" and bool(torch.all(above_cutoff(t, self.cutoff))):
            return 1.0
        return cond.guidance_scale

    def predict(self, x: Tensor, t: Tensor, cond: Cond, network: Optional[nn.Module] = None) -> Tensor:
        """The network's native prediction at time t, with classifier-free guidance where ``guided``.

        ``t`` is a 0-d tensor (sampling) or one time per row (training). ``network`` overrides the
        network that runs (training passes the one it trains); by default ``network_at(t)``. With
        scale w > 1 (``guidance_at``) it is ``uncond + w (cond - uncond)``: two calls, one batch.
        """
        net = network if network is not None else self.network_at(t)
        # float32 whatever the model's dtype (bf16 has 8 bits of mantissa and turns 999 into 1000); a
        # sampler's time (0-d, on the host) is filled in on the device: copying it over would make the
        # host wait for the previous step on CUDA (a synchronising host-to-device copy per step)
        timestep = self.schedule.timestep(t)
        if timestep.ndim == 0 and timestep.device.type == "cpu":
            timestep = torch.full((x.shape[0],), float(timestep), device=x.device, dtype=torch.float32)
        else:
            timestep = timestep.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        scale = self.guidance_at(t, cond)
        if not self.guided or scale <= 1.0:
            return self._call(x, timestep, cond, net)
        both = self._call(torch.cat([x, x]), torch.cat([timestep, timestep]), cond.guided_batch(self.null_class), net)
        uncond, conditional = both.chunk(2)
        return uncond + scale * (conditional - uncond)

    # -- model space <-> images -----------------------------------------------------------------
    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """Where the recipe asks for it (``model.autocast``), the network runs under autocast."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Final model-space samples to images in [0, 1], shape (B, C, H, W).

        Large images decode one at a time (``VAE_SLICE_ABOVE`` pixels) and in tiles
        (``VAE_TILE_ABOVE``): the VAE decoder's activations, not the UNet's, set the peak there.
        """
        if self.latent:
            pixels = self.image_shape[1] * self.image_shape[2]
            if pixels > VAE_SLICE_ABOVE and hasattr(self.vae, "enable_slicing"):
                self.vae.enable_slicing()
            if pixels > VAE_TILE_ABOVE and hasattr(self.vae, "enable_tiling"):
                self.vae.enable_tiling()
        return ((self.adapter.decode(self.vae, x).float() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, C, H, W) to model space (latents for a pipeline with a VAE)."""
        return self.adapter.encode_images(self.vae, images * 2.0 - 1.0)


@dataclass
class PromptCache:
    """Each distinct prompt's encoding (``LoadedModel.encode``'s part for it), computed once and reused.

    Valid while the text encoders do not change (a fine-tune: they are frozen). It holds at most
    ``max_bytes`` of tensors, on the device they were encoded on; prompts beyond that are encoded each
    time they come, as without a cache.
    """

    max_bytes: int
    parts: dict[tuple[str, bool], Cond] = field(default_factory=dict)
    held: int = 0
    encoded: int = 0  # calls of the text encoders (a prompt each)

    def get(self, key: tuple[str, bool], encode: Callable[[], Cond]) -> Cond:
        """The part cached under ``key`` (prompt, with the negative prompt), else ``encode()`` (kept if it fits)."""
        if key in self.parts:
            return self.parts[key]
        part = encode()
        self.encoded += 1
        size = sum(v.nbytes for v in part.tensors())
        if self.held + size <= self.max_bytes:
            self.parts[key], self.held = part, self.held + size
        return part


def distinct(prompts: list[str]) -> tuple[list[str], list[int]]:
    """The distinct prompts in first-seen order, and each row's position among them."""
    unique = list(dict.fromkeys(prompts))
    slot = {p: k for k, p in enumerate(unique)}
    return unique, [slot[p] for p in prompts]


def tuned_identity(model: LoadedModel) -> str:
    """A hash of the composed model's weights that differ from the base (tuned net or adapter)."""
    h = hashlib.sha256(f"{model.base_identity or model.identity}:{model.cutoff}:{model.tuned_guidance}".encode())
    state = lora_state(model.network) if model.lora else (model.tuned.state_dict() if model.tuned is not None else {})
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def base_only(model: LoadedModel) -> Iterator[LoadedModel]:
    """The base model inside a composed one (tuned network set aside, LoRA adapter off)."""
    saved = (model.tuned, model.lora, model.identity)
    parked = None if model.base_runs else next(model.network.parameters()).device
    if parked is not None:  # a full fine-tune at cutoff 0 keeps its base on the CPU: bring it over
        model.network.to(model.device)
    if model.lora:
        set_lora_enabled(model.network, False)
    model.tuned, model.lora = None, False
    model.identity = model.base_identity or model.identity
    try:
        yield model
    finally:
        model.tuned, model.lora, model.identity = saved
        if parked is not None:
            model.network.to(parked)
        if model.lora:
            set_lora_enabled(model.network, True)
