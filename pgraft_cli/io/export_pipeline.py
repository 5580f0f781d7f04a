"""PgraftPipeline: pgraft's composed sampler as a diffusers custom pipeline (diffusers + torch only).

``pgraft export`` copies this file verbatim into an exported folder as ``pipeline.py``, so that
``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` samples as ``pgraft sample`` does,
without pgraft installed. It must import nothing but torch and diffusers.

The sampler (docs/methods.md): time t in [0, 1], t = 1 noise, ``x_t = alpha(t) x_0 + sigma(t) e``.

- inverse noise correction: the initial noise ``e`` goes through the ``corrector`` (a flow,
  ``corrector_steps`` steps of ``corrector_sampler`` (euler, or heun: two calls a step) on a uniform grid, or a ``GaussianCorrector``: ``z = mean + L e``)
  before the base sampler;
- P-GRAFT: ``tuned_unet`` runs for grid times ``t > cutoff`` and ``unet`` below; with
  ``tuned_guidance = "none"`` the tuned segment runs the conditional branch alone (scale 1);
- grid: flow ``u = linspace(1, 0, N + 1)`` shifted to ``s u / (1 + (s - 1) u)``, Euler steps;
  diffusion DDIM "trailing" timesteps ``round(T - k T / N) - 1``, then t = 0, DDIM steps (eta = 0).
- families (``family``, pgraft's adapter names): pixel ``unet2d``, ``sd`` (SD 1.x/2.x), ``sdxl`` (two CLIP
  encoders, pooled embedding, time ids ``(H, W, 0, 0, H, W)``), ``sd3`` (pooled projections, flow) and
  ``pixart`` (T5 states with their mask), ``dit`` (class labels, learned sigma), ``flux`` (Flux.1 dev and
  schnell: CLIP pooled + T5 states, the unpacked latent packed into 2x2 patches with image ids
  ``(0, row, col)`` and text ids 0 for each call, timestep ``t``; no classifier-free guidance: dev takes
  ``guidance_scale`` as its distilled guidance input; the flow shift is the scheduler's dynamic shift
  ``exp(mu)`` at the sample's token count, fixed for the native size as pgraft does); prompts go through
  the family's own diffusers pipeline's ``encode_prompt`` built on this folder's components (``_encode``),
  the network is called as pgraft's adapters call it (``_call``).
- a text-conditioned corrector (SDXL, SD3, Flux) takes each prompt's pooled text embedding ``c``: the
  Gaussian's mean is ``mean + c W``; the flow's network gets ``projection(c)`` as its class embedding.

The maths repeats pgraft's core/samplers.py on purpose (this file travels alone); the export tests
pin it to ``pgraft sample`` to 1e-5. The networks run in the memory format their weights were loaded in
(contiguous): ``pgraft sample``'s ``sample.memory_format`` (channels_last on the CPU for a UNet2DModel) is not
recorded or applied here (``pipe.unet.to(memory_format=torch.channels_last)`` applies it). The two formats
round differently, and how far that goes depends on the computation: sampled images differ by at most 1 in
uint8 on the digits model, but the inversion's ill-conditioned last step amplifies it (pgraft's inverted
noises up to 8.2e-2 apart), so a corrector trained in one format is not the one the other would train.
"""

# No ``from __future__ import annotations`` here: diffusers (0.35 at least) reads the annotations of
# ``PgraftPipeline.__init__`` to type-check what it loads, and a string annotation ended from_pretrained with a
# KeyError; the components are left unannotated for the same reason (``typing.Any`` is no class before Python 3.11).
import inspect
import math
from typing import Any, Optional, Union

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config

CUTOFF_TOL = 1e-9


def _alphas_cumprod(config: dict) -> torch.Tensor:
    """``prod(1 - beta)`` of a DDPM/DDIM scheduler config, in float64."""
    T, start, end = int(config.get("num_train_timesteps", 1000)), config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def _dynamic_shift(config: dict, image_seq_len: int) -> float:
    """The static shift of a dynamically shifted flow scheduler at ``image_seq_len`` tokens: ``mu`` linear in the
    token count through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``; the time shift
    ``e^mu / (e^mu + 1/t - 1)`` is ``s t / (1 + (s - 1) t)`` with ``s = e^mu`` (``mu`` for ``time_shift_type = linear``)."""
    lo, hi = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    m = (top - base) / (hi - lo)
    mu = image_seq_len * m + (base - m * lo)
    return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def _pack(x: torch.Tensor) -> torch.Tensor:
    """Flux: (B, C, H, W) -> (B, H/2 W/2, 4C), row-major 2x2 patches, channel-major inside a patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`_pack` for an (H, W) latent."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def _image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux: position ids ``(0, row, col)`` of the (H/2, W/2) patch grid, one row per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _autocast_dtype(setting: Optional[str], device_type: str, dtype: torch.dtype) -> Optional[torch.dtype]:
    """pgraft's ``model.autocast`` rule: bf16 when "bf16", or "auto" on CUDA, for float32 weights; else None."""
    wanted = setting == "bf16" or (setting == "auto" and device_type == "cuda")
    return torch.bfloat16 if wanted and dtype == torch.float32 else None


class Schedule:
    """pgraft's noise schedule for one scheduler config (flow if its class is a FlowMatch scheduler)."""

    def __init__(self, config: dict, flow: Optional[bool] = None, image_seq_len: int = 256):
        self.flow = "FlowMatch" in config.get("_class_name", "") if flow is None else flow
        self.T = int(config.get("num_train_timesteps", 1000))
        self.shift = float(config.get("shift", 1.0)) if self.flow else 1.0
        if self.flow and config.get("use_dynamic_shifting"):
            self.shift = _dynamic_shift(config, image_seq_len)
        self.prediction = "flow" if self.flow else config.get("prediction_type", "epsilon")
        self.abar = None if self.flow else _alphas_cumprod(config)

    def grid(self, steps: int) -> torch.Tensor:
        if self.flow:
            u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            return self.shift * u / (1.0 + (self.shift - 1.0) * u)
        k = torch.arange(steps, dtype=torch.float64)
        timesteps = torch.round(self.T - k * self.T / steps) - 1
        if timesteps[-1] < 1:  # as pgraft's grid: timestep 0 would be read as the data (alpha = 1)
            raise ValueError(f"diffusion sampling with {steps} steps of {self.T} puts its last step at timestep 0; "
                             f"use at most {2 * self.T // 3} steps")
        return torch.cat([timesteps / self.T, torch.zeros(1, dtype=torch.float64)])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.flow:
            return 1.0 - t, t
        pos = (t * self.T).clamp(0, self.T - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=self.T - 1)
        w = pos - lo
        abar = (1 - w) * self.abar[lo] + w * self.abar[hi]
        abar = torch.where(t <= 0, torch.ones_like(abar), abar)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def step(self, x: torch.Tensor, pred: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Flow: Euler ``x + (t' - t) v``. Diffusion: DDIM ``alpha(t') x0_hat + sigma(t') e_hat``."""
        if self.flow:
            return x + (t_next - t).to(x.dtype) * pred
        a, s = (v.to(x.dtype) for v in self.alpha_sigma(t))
        if self.prediction == "epsilon":
            x0, eps = (x - s * pred) / a, pred
        elif self.prediction == "v_prediction":
            x0, eps = a * x - s * pred, s * x + a * pred
        else:  # sample
            x0, eps = pred, (x - a * pred) / s
        a, s = (v.to(x.dtype) for v in self.alpha_sigma(t_next))
        return a * x0 + s * eps

    def run(self, denoiser: Any, x: torch.Tensor, grid: torch.Tensor, callback: Any = None) -> torch.Tensor:
        for k in range(len(grid) - 1):
            x = self.step(x, denoiser(x, grid[k]), grid[k], grid[k + 1])
            if callback is not None:
                callback(k)
        return x


class GaussianCorrector(ModelMixin, ConfigMixin):
    """A Gaussian noise corrector on flattened noise: ``z = mean + L e`` (``scale`` = L, the Cholesky
    factor of the inverted noises' covariance) or, ``diagonal``, ``z = mean + std * e``; in float64.
    ``text_dim > 0``: conditioned on each row's pooled text embedding ``c``, the mean is ``mean + c W``
    (``weight`` = W, (text_dim, dim)).

    The float64 values are held as their int64 bit patterns (:meth:`bits`, read back by :meth:`value`): a cast
    of the whole pipeline (``torch_dtype=torch.bfloat16``, ``pipe.to(torch.bfloat16)``) casts floating tensors
    only, so it leaves them exact.

    ``pgraft export`` writes this file a second time as ``corrector/pipeline.py``, where diffusers looks
    for a custom component's class."""

    @register_to_config
    def __init__(self, dim: int, diagonal: bool = False, text_dim: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.int64))
        self.register_buffer("scale", torch.zeros((dim,) if diagonal else (dim, dim), dtype=torch.int64))
        if text_dim:
            self.register_buffer("weight", torch.zeros(text_dim, dim, dtype=torch.int64))

    @staticmethod
    def bits(values: torch.Tensor) -> torch.Tensor:
        """``values`` in float64 as the int64 tensor of their bit patterns (what the buffers hold)."""
        return values.to(torch.float64).contiguous().view(torch.int64)

    def value(self, name: str) -> torch.Tensor:
        """The float64 values of buffer ``name`` (``mean``, ``scale``, ``weight``)."""
        return getattr(self, name).view(torch.float64)

    def forward(self, noise: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        flat = noise.reshape(noise.shape[0], -1).double()
        scale = self.value("scale")
        spread = flat * scale if self.config.diagonal else flat @ scale.T
        mean = self.value("mean")
        if self.config.text_dim:
            mean = mean + condition.to(mean.device).double() @ self.value("weight")
        return (mean + spread).to(noise.dtype).reshape(noise.shape)


class TextFlowCorrector(ModelMixin, ConfigMixin):
    """A flow corrector conditioned on each row's pooled text embedding ``c``: a UNet2DModel (``unet_config``,
    class embedding ``identity``) whose class embedding is ``projection(c)``, a linear map to its time embedding's
    width. Written, like :class:`GaussianCorrector`, to ``corrector/pipeline.py``."""

    @register_to_config
    def __init__(self, unet_config: dict, text_dim: int, width: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.network = UNet2DModel.from_config(unet_config)
        self.projection = torch.nn.Linear(text_dim, width)

    def forward(self, z: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.network(z, timestep, class_labels=self.projection(condition.to(z.device, z.dtype))).sample


TEXT_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def _both(negative: Any, positive: Any) -> Any:
    """The inputs of one guided call, ``[unconditional; conditional]`` rows (nested dicts alike)."""
    if isinstance(positive, dict):
        return {k: _both(negative[k], v) for k, v in positive.items()}
    if positive is None:
        return None
    return torch.cat([negative, positive])


class PgraftPipeline(DiffusionPipeline):
    """A base network, optionally a tuned network above ``cutoff`` and a noise corrector, as pgraft composes them.

    ``unet`` is the base network of ``family`` (a UNet2DModel; the UNet2DConditionModel of SD or SDXL, or
    the SD3 / PixArt / DiT / Flux transformer, with ``vae`` and the family's text encoders and tokenizers);
    ``scheduler`` carries its schedule's config. ``autocast``: pgraft's ``model.autocast`` ("auto": bf16 on CUDA,
    "bf16", "no"; None: none), applied to the network calls as ``pgraft sample`` does (:func:`_autocast_dtype`);
    ``corrector_dtype``: the dtype a network corrector computes in, which a cast of the whole pipeline must keep.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->corrector->tuned_unet->unet->vae"
    _optional_components = ["tuned_unet", "corrector", *TEXT_PARTS]

    def __init__(self, unet, scheduler, tuned_unet=None, corrector=None, vae=None,
                 text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 text_encoder_3=None, tokenizer_3=None, cutoff: float = 0.0,
                 tuned_guidance: str = "reapply", corrector_steps: int = 0, corrector_sampler: str = "euler", base_steps: Optional[int] = None,
                 null_class: Optional[int] = None, guidance_scale: float = 1.0, family: Optional[str] = None,
                 force_zeros_for_empty_prompt: bool = True, text_pipeline: Optional[str] = None,
                 autocast: Optional[str] = None, corrector_dtype: Optional[str] = None,
                 corrector_guidance: Optional[float] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, tuned_unet=tuned_unet, corrector=corrector, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(cutoff=cutoff, tuned_guidance=tuned_guidance, corrector_steps=corrector_steps,
                                corrector_sampler=corrector_sampler, base_steps=base_steps, null_class=null_class, guidance_scale=guidance_scale,
                                family=family, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                text_pipeline=text_pipeline, autocast=autocast, corrector_dtype=corrector_dtype,
                                corrector_guidance=corrector_guidance)

    # -- pieces -----------------------------------------------------------------------------------
    def _above(self, t: torch.Tensor) -> bool:
        return bool(t > self.config.cutoff + CUTOFF_TOL)

    def _family(self) -> str:
        """pgraft's family name (folders written before it was recorded: SD if text, else a pixel UNet)."""
        return self.config.get("family") or ("sd" if self.text_encoder is not None else "unet2d")

    def _shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample in model space: the network's own size; Flux: the unpacked latent of the
        VAE's native image size, ``(in_channels / 4, 2 (h // 2f), 2 (w // 2f))`` for VAE scale f."""
        config = self.unet.config
        if self._family() != "flux":
            return (config.in_channels, *_size(config.sample_size))
        f = 2 * self._vae_scale()
        h, w = _size(self.vae.config.sample_size)
        return (config.in_channels // 4, 2 * (h // f), 2 * (w // f))

    def _tokens(self, shape: tuple[int, int, int]) -> int:
        """Tokens the network sees per sample, the dynamic shift's input: ``(H / p) (W / p)``, p = 2 for Flux's
        packed patches, else the network's ``patch_size`` (1 without one)."""
        patch = 2 if self._family() == "flux" else int(self.unet.config.get("patch_size") or 1)
        return (shape[1] // patch) * (shape[2] // patch)

    def _vae_scale(self) -> int:
        """Image pixels per latent pixel: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _encode(self, prompts: list[str], guided: bool) -> tuple[dict, dict]:
        """The network's text inputs for ``prompts`` and for the empty negative prompt (``{}`` unless ``guided``),
        encoded by the family's own pipeline (``encode_prompt``) on this folder's components."""
        import diffusers

        family, device = self._family(), self._execution_device
        cls = getattr(diffusers, self.config.get("text_pipeline") or "StableDiffusionPipeline")
        accepted = inspect.signature(cls.__init__).parameters
        parts = {k: getattr(self, k) for k in TEXT_PARTS + ("scheduler",) if k in accepted}
        parts["transformer" if "transformer" in accepted else "unet"] = self.unet
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
                 "add_watermarker": False, "force_zeros_for_empty_prompt": self.config.force_zeros_for_empty_prompt}
        pipe = cls(**parts, **{k: v for k, v in extra.items() if k in accepted})
        if family == "sd":
            pe, npe = pipe.encode_prompt(prompts, device, 1, guided)
            return {"encoder_hidden_states": pe}, {"encoder_hidden_states": npe} if guided else {}
        if family == "pixart":  # T5 states and their mask, at the pipeline's own length; micro-conditions
            length = inspect.signature(cls.__call__).parameters["max_sequence_length"].default
            pe, mask, npe, nmask = pipe.encode_prompt(prompts, do_classifier_free_guidance=guided, device=device,
                                                      clean_caption=False, max_sequence_length=length)
            added = {"resolution": None, "aspect_ratio": None}
            if self.unet.use_additional_conditions:
                h, w = (n * self._vae_scale() for n in _size(self.unet.config.sample_size))
                added = {"resolution": torch.tensor([[h, w]], dtype=pe.dtype, device=device).expand(len(prompts), 2),
                         "aspect_ratio": torch.tensor([[h / w]], dtype=pe.dtype, device=device).expand(len(prompts), 1)}
            return ({"encoder_hidden_states": pe, "encoder_attention_mask": mask, "added_cond_kwargs": added},
                    {"encoder_hidden_states": npe, "encoder_attention_mask": nmask, "added_cond_kwargs": added}
                    if guided else {})
        if family == "flux":  # CLIP pooled + T5 states at the pipeline's own length; no negative prompt
            length = inspect.signature(cls.__call__).parameters["max_sequence_length"].default
            pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=length)
            return {"encoder_hidden_states": pe, "pooled_projections": pooled}, {}
        if family == "sd3":
            pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                          num_images_per_prompt=1, do_classifier_free_guidance=guided)
            return ({"encoder_hidden_states": pe, "pooled_projections": pooled},
                    {"encoder_hidden_states": npe, "pooled_projections": npooled} if guided else {})
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=guided)  # sdxl: (H, W, 0, 0, H, W)
        h, w = (n * self._vae_scale() for n in _size(self.unet.config.sample_size))
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pe.dtype, device=device).expand(len(prompts), 6)
        return ({"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
                {"encoder_hidden_states": npe, "added_cond_kwargs": {"text_embeds": npooled, "time_ids": ids}}
                if guided else {})

    def _pooled(self, prompts: list[str], inputs: dict) -> torch.Tensor:
        """Each prompt's pooled text embedding in float32, a text-conditioned corrector's input: the one the network
        takes (SDXL's ``text_embeds``, SD3's and Flux's ``pooled_projections``); SD 1.x/2.x: the CLIP text
        encoder's ``pooler_output`` (the end-of-text token's final state), which its UNet never reads."""
        if self._family() != "sd":
            return inputs.get("pooled_projections", inputs.get("added_cond_kwargs", {}).get("text_embeds")).float()
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self._execution_device)).pooler_output.float()

    def _call(self, net: Any, x: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The network's prediction for model-space ``x`` at ``timestep`` (``t T``), as pgraft's adapter calls it.
        Flux: ``x`` packed into 2x2 patches with their image ids, text ids 0, the timestep as ``t``."""
        if self._family() != "flux":
            return net(x, timestep=timestep, **inputs).sample[:, : x.shape[1]]  # learned variance: (mean, variance)
        _, _, h, w = x.shape
        txt_ids = torch.zeros(inputs["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        out = net(hidden_states=_pack(x), timestep=timestep / 1000, img_ids=_image_ids(h, w, x.device, x.dtype),
                  txt_ids=txt_ids, **inputs).sample
        return _unpack(out, h, w)

    def _corrected(self, noise: torch.Tensor, condition: Optional[torch.Tensor]) -> torch.Tensor:
        """``e -> z``: the corrector flow (``v = e - z``, t = 1 noise) in its own dtype, back in the caller's;
        or the Gaussian map (by name: the class loaded from corrector/pipeline.py is another module's).
        ``condition``: each row's pooled text embedding for a text-conditioned corrector, else None."""
        if type(self.corrector).__name__ == "GaussianCorrector":
            return self.corrector(noise, condition)
        own, exported = self.corrector.dtype, self.config.get("corrector_dtype")
        if exported is not None and own != getattr(torch, exported):
            raise ValueError(f"the noise corrector was exported in {exported} and is now {own}, its weights rounded by "
                             f"a cast of the whole pipeline (torch_dtype=..., pipe.to(dtype)); load the folder with "
                             f'torch_dtype={{"default": {own}, "corrector": torch.{exported}}} (dtype= in newer diffusers)')
        flow = Schedule({}, flow=True)

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = (t * flow.T).to(device=z.device, dtype=torch.float32).expand(z.shape[0])
            if condition is None:
                return self.corrector(z.to(own), timestep).sample
            return self.corrector(z.to(own), timestep, condition)

        grid, z = flow.grid(self.config.corrector_steps), noise.to(own)
        if getattr(self.config, "corrector_sampler", "euler") != "heun":
            return flow.run(velocity, z, grid).to(noise.dtype)
        for t, t_next in zip(grid[:-1], grid[1:]):  # Heun: x' = x + h (d + v(x + h d, t')) / 2, d = v(x, t)
            h = (t_next - t).to(z.dtype)
            d = velocity(z, t)
            z = z + h / 2 * (d + velocity(z + h * d, t_next))
        return z.to(noise.dtype)

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, batch_size: int = 1,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 class_labels: Optional[list[int]] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True) -> Union[ImagePipelineOutput, tuple]:
        """Sample images. ``latents`` is the initial N(0, I) noise (before the corrector);
        ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (final model-space x);
        ``guidance_scale``: by default the one ``pgraft sample`` used (the export's config); for Flux dev the
        distilled guidance input (``sample.distilled_guidance``), as in ``FluxPipeline``; unused by Flux schnell."""
        cfg = self.config
        if guidance_scale is None:
            guidance_scale = float(cfg.get("guidance_scale", 1.0))
        steps = num_inference_steps or cfg.base_steps
        if steps is None:
            raise ValueError("pass num_inference_steps")
        if self.corrector is not None and cfg.base_steps is not None and steps != cfg.base_steps:
            raise ValueError(f"the noise corrector was fitted for {cfg.base_steps} base steps; pass num_inference_steps={cfg.base_steps}")
        fitted = cfg.get("corrector_guidance")  # a conditioned base is inverted at one guidance (None: any)
        if self.corrector is not None and fitted is not None and guidance_scale != fitted:
            raise ValueError(f"the noise corrector was fitted to the base sampler at guidance {fitted:g}; pass "
                             f"guidance_scale={fitted:g}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if prompts is not None:
            batch_size = len(prompts)
        if class_labels is not None:
            batch_size = len(class_labels)
        unet, device, shape = self.unet, self._execution_device, self._shape()
        text = self.text_encoder is not None
        labels = None if class_labels is None else torch.tensor(class_labels, device=device, dtype=torch.long)
        # Flux takes no classifier-free guidance: dev reads guidance_scale as its distilled guidance input
        distilled = self._family() == "flux"
        guided = not distilled and (text or (labels is not None and cfg.null_class is not None)) and guidance_scale > 1.0
        if text:
            inputs, negative = self._encode(prompts or [""] * batch_size, guided)
        else:
            inputs = {} if labels is None else {"class_labels": labels}
            negative = {} if labels is None or cfg.null_class is None else {"class_labels": torch.full_like(labels, cfg.null_class)}
        if distilled and unet.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch_size,), guidance_scale, device=device, dtype=torch.float32)

        noise = latents if latents is not None else torch.randn((batch_size, *shape), generator=generator, dtype=torch.float32)
        noise = noise.to(device, unet.dtype)
        if self.corrector is not None:  # a text-conditioned one takes each prompt's pooled embedding
            text_corrector = self.corrector.config.get("text_dim")
            pooled = self._pooled(prompts or [""] * batch_size, inputs) if text_corrector else None
            noise = self._corrected(noise, pooled)
        schedule = Schedule(dict(self.scheduler.config) | {"_class_name": type(self.scheduler).__name__},
                            image_seq_len=self._tokens(shape))

        def call(net: Any, x: torch.Tensor, timestep: torch.Tensor, both: bool) -> torch.Tensor:
            return self._call(net, x, timestep, _both(negative, inputs) if both else inputs)

        def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            above = self.tuned_unet is not None and self._above(t)
            net = self.tuned_unet if above else unet
            scale = 1.0 if above and cfg.tuned_guidance == "none" else guidance_scale
            timestep = (t * schedule.T).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
            if not guided or scale <= 1.0:
                return call(net, x, timestep, False)
            uncond, conditional = call(net, torch.cat([x, x]), torch.cat([timestep, timestep]), True).chunk(2)
            return uncond + scale * (conditional - uncond)

        grid = schedule.grid(steps)
        autocast = _autocast_dtype(cfg.get("autocast"), device.type, unet.dtype)  # x stays in the weights' float32
        with self.progress_bar(total=steps) as bar, torch.autocast(device.type, autocast, enabled=autocast is not None):
            x = schedule.run(denoiser, noise, grid, callback=lambda k: bar.update())
        if output_type == "latent":
            images = x
        else:
            if self.vae is not None:
                vc = self.vae.config
                # a float16 VAE that sets force_upcast (SDXL's overflows: NaN images) decodes in float32, as
                # pgraft sample and diffusers' upcast_vae do
                upcast = self.vae.dtype == torch.float16 and getattr(vc, "force_upcast", False)
                if upcast:
                    self.vae.to(torch.float32)
                try:
                    latents = x / vc.scaling_factor + (getattr(vc, "shift_factor", None) or 0.0)
                    x = self.vae.decode(latents.to(self.vae.dtype)).sample
                finally:
                    if upcast:
                        self.vae.to(torch.float16)
            images = ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _size(sample_size: Any) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
