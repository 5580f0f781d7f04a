"""Shared fixtures: tiny, randomly initialised diffusers models built on the spot (no downloads).

Every builder seeds torch itself, so two calls with the same arguments give the same weights.
Folders are written with ``save_pretrained(safe_serialization=True)``, exactly as a user's would be.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

# Under pytest-xdist (``-n 2``) the workers share the cores: one thread each, for the CLI
# subprocesses too, rather than every worker's OpenMP pool spinning on every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
SCHEDULERS = ("ddpm", "ddim", "flow")


# ----------------------------------------------------------------------------------------------
# Pixel-space UNet2DModel


def build_tiny_unet(channels: int = 1, num_class_embeds: Optional[int] = None, seed: int = 0,
                    **overrides: Any):
    """A UNet2DModel of a few thousand parameters on 8x8 images."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    config = dict(TINY_UNET, in_channels=channels, out_channels=channels, **overrides)
    if num_class_embeds is not None:
        config["num_class_embeds"] = num_class_embeds
    return UNet2DModel(**config).eval()


def build_scheduler(scheduler: str = "ddpm", prediction_type: str = "epsilon", shift: float = 1.0):
    """A diffusers scheduler: ``ddpm``, ``ddim`` or ``flow`` (FlowMatchEulerDiscreteScheduler)."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if scheduler == "ddpm":
        return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    if scheduler == "ddim":
        return DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    if scheduler == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(scheduler)


@pytest.fixture
def tiny_unet() -> Callable[..., Any]:
    """``tiny_unet(channels=1, num_class_embeds=None, seed=0, **config)`` -> a UNet2DModel."""
    return build_tiny_unet


@pytest.fixture
def unet_pipeline_dir(tmp_path: Path) -> Callable[..., Path]:
    """``unet_pipeline_dir(scheduler="ddpm"|"ddim"|"flow", prediction_type=..., channels=...)``.

    Writes a DDPMPipeline (DDIMPipeline for ``ddim``) folder with ``model_index.json`` under
    tmp_path and returns it; ``flow`` is a DDPMPipeline folder holding a FlowMatch scheduler.
    """
    counter = iter(range(10**6))

    def build(scheduler: str = "ddpm", prediction_type: str = "epsilon", channels: int = 1,
              shift: float = 1.0, num_class_embeds: Optional[int] = None, seed: int = 0) -> Path:
        from diffusers import DDIMPipeline, DDPMPipeline

        unet = build_tiny_unet(channels, num_class_embeds, seed)
        sched = build_scheduler(scheduler, prediction_type, shift)
        pipe_cls = DDIMPipeline if scheduler == "ddim" else DDPMPipeline
        out = tmp_path / f"pipe-{scheduler}-{prediction_type}-{next(counter)}"
        pipe_cls(unet=unet, scheduler=sched).save_pretrained(out, safe_serialization=True)
        return out

    return build


@pytest.fixture
def unet_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """``unet_model_dir(scheduler=None|"ddpm"|"ddim"|"flow", ...)``: a bare model folder.

    ``config.json`` + ``diffusion_pytorch_model.safetensors``, plus ``scheduler_config.json``
    beside them when ``scheduler`` is given.
    """
    counter = iter(range(10**6))

    def build(scheduler: Optional[str] = None, prediction_type: str = "epsilon", channels: int = 1,
              shift: float = 1.0, num_class_embeds: Optional[int] = None, seed: int = 0) -> Path:
        out = tmp_path / f"model-{scheduler}-{next(counter)}"
        build_tiny_unet(channels, num_class_embeds, seed).save_pretrained(out, safe_serialization=True)
        if scheduler is not None:
            build_scheduler(scheduler, prediction_type, shift).save_config(out)
        return out

    return build


# ----------------------------------------------------------------------------------------------
# Text-to-image pipelines


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet (every byte maps to one printable character)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_clip_tokenizer_files(folder: Path) -> Path:
    """A byte-level CLIP vocab.json/merges.txt: every character, bare and word-final, no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


TOKENIZER_VOCAB = 2 * 256 + 2
TOKENIZER_MAX_LENGTH = 16


def build_tiny_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TOKENIZER_MAX_LENGTH)


def _clip_config(hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=hidden, intermediate_size=37,
                          num_hidden_layers=1, num_attention_heads=2, projection_dim=projection,
                          max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=TOKENIZER_VOCAB - 2,
                          eos_token_id=TOKENIZER_VOCAB - 1, pad_token_id=TOKENIZER_VOCAB - 1)


def _tiny_vae(latent_channels: int = 4, **extra: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                         norm_num_groups=4, sample_size=16, **extra)


def build_tiny_sd_pipeline(folder: Path) -> Path:
    """A Stable Diffusion 1.x-layout pipeline folder: 8x8 latents, 16x16 RGB images."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_clip_config())
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3_pipeline(folder: Path, shift: float = 3.0) -> Path:
    """An SD3-layout pipeline folder with two CLIP encoders and no T5: 8x8 latents, 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=64, pooled_projection_dim=64)
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Stable Diffusion 1.x pipeline folder (built once per session; do not modify)."""
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD3 pipeline folder, shift 3.0, no T5 (built once per session; do not modify)."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture
def streamed_digits_file(tmp_path, monkeypatch):
    """A 300-image .safetensors data file, the sizes of every read of it (``_check`` sees each
    batch), and ``load_data`` made to fail: a verb given it must read it batch by batch."""
    from safetensors.torch import save_file

    import pgraft_cli.io.data as data_mod

    path = tmp_path / "digits.safetensors"
    save_file({"images": data_mod.load_digits(split="train")[0][:300].contiguous()}, str(path))
    read_sizes: list[int] = []
    check = data_mod._check
    monkeypatch.setattr(data_mod, "_check", lambda images, *a: read_sizes.append(len(images)) or check(images, *a))
    monkeypatch.setattr(data_mod, "load_data", lambda *a: pytest.fail("load_data read the whole data set"))
    return path, read_sizes
