"""Shared fixtures: tiny, randomly initialised diffusers models built on the spot (no downloads).

Every builder seeds torch itself, so two calls with the same arguments give the same weights.
Folders are written with ``save_pretrained(safe_serialization=True)``, exactly as a user's would be.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

# Under pytest-xdist (``-n 2``) the workers share the cores: one thread each, for the CLI
# subprocesses too, rather than every worker's OpenMP pool spinning on every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Collecting imports torch, diffusers, transformers and peft: with the collector held, as the pgraft command
# holds it for its imports (``io.host.gc_paused``); ``pytest_collection`` switches it back on.
gc.disable()

import pytest  # noqa: E402
import torch  # noqa: E402
import typer.main  # noqa: E402

TINY_UNET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
SCHEDULERS = ("ddpm", "ddim", "flow")
# One block, no attention and no resampling: the compile test's network (a fresh CI machine's empty inductor
# cache makes every new graph cost seconds of C++ compiling: 24 s for the two-block UNet with attention, 19 s
# for this), and the cache-keys tests' (their many runs: 38.8 s against 44.7 s for the file on one worker).
ONE_BLOCK_UNET = dict(block_out_channels=(8,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                      add_attention=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_user_cache: the test gets an empty user cache of its own")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """After collecting (in every xdist worker and in the controller, which collects nothing; also when
    collecting fails): freeze what it left alive and switch the collector back on, as the pgraft command
    freezes its imports (``io.host.gc_paused``).

    The test modules import torch, diffusers, transformers and peft: about half a million objects that live
    as long as the worker. Unfrozen, every full collection the tests' allocations set off rescans them all
    (about 25 s of a worker's 2.5 minutes, measured with ``gc.callbacks``); frozen, collections skip them.
    What the tests allocate later is collected as usual. A test that freezes does not ``gc.unfreeze()``:
    that would hand all of this back to the collector.
    """
    try:
        return (yield)
    finally:
        _collector_on()


def pytest_collection_finish(session: pytest.Session) -> None:
    """The same, where conftest was first imported during collection (pytest started from a parent folder):
    its ``pytest_collection`` wrapper then missed that collection, and the collector would stay off."""
    if not gc.isenabled():
        _collector_on()


def _collector_on() -> None:
    gc.collect()
    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory: pytest.TempPathFactory):
    """One user cache (reference statistics) per session (per xdist worker), never the real home. Its
    files are named by a hash of the extractor, the data and the resize rule, and a cached reference
    gives the computed FID bit for bit (test_refstats), so a statistic is computed once, not per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(autouse=True)
def _own_user_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty user cache for a test marked ``own_user_cache`` (tests of the cache itself)."""
    if request.node.get_closest_marker("own_user_cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


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
    """``unet_pipeline_dir(scheduler="ddpm"|"ddim"|"flow", prediction_type=..., channels=..., **config)``.

    Writes a DDPMPipeline (DDIMPipeline for ``ddim``) folder with ``model_index.json`` under
    tmp_path and returns it; ``flow`` is a DDPMPipeline folder holding a FlowMatch scheduler.
    ``config`` overrides the tiny UNet's config keys.
    """
    counter = iter(range(10**6))

    def build(scheduler: str = "ddpm", prediction_type: str = "epsilon", channels: int = 1,
              shift: float = 1.0, num_class_embeds: Optional[int] = None, seed: int = 0, **config: Any) -> Path:
        from diffusers import DDIMPipeline, DDPMPipeline

        unet = build_tiny_unet(channels, num_class_embeds, seed, **config)
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


T5_CHARS = [chr(c) for c in range(32, 127)]
T5_VOCAB = 3 + 2 * len(T5_CHARS) + 1


def build_tiny_t5_tokenizer():
    """A T5TokenizerFast over printable ASCII, bare and word-initial (unigram, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in T5_CHARS]
    pieces += [("\u2581" + c, -1.0) for c in T5_CHARS] + [("\u2581", -1.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def build_tiny_t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def _clip_config(hidden: int = 32, projection: int = 32, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=hidden, intermediate_size=37, hidden_act=hidden_act,
                          num_hidden_layers=1, num_attention_heads=2, projection_dim=projection,
                          max_position_embeddings=TOKENIZER_MAX_LENGTH, bos_token_id=TOKENIZER_VOCAB - 2,
                          eos_token_id=TOKENIZER_VOCAB - 1, pad_token_id=TOKENIZER_VOCAB - 1)


def _tiny_vae(latent_channels: int = 4, **extra: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                         norm_num_groups=4, sample_size=16, **extra)


def build_tiny_sd_pipeline(folder: Path, sd2: bool = False) -> Path:
    """A Stable Diffusion 1.x-layout pipeline folder: 8x8 latents, 16x16 RGB images. ``sd2``: the 2.x
    layout (linear attention projections, a GELU text encoder as OpenCLIP's, v-prediction)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=sd2)
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_clip_config(hidden_act="gelu" if sd2 else "quick_gelu"))
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd3_pipeline(folder: Path, shift: float = 3.0, t5: bool = False, released: bool = False) -> Path:
    """An SD3-layout pipeline folder with two CLIP encoders (``t5``: and a T5 one, as released; else
    none): 8x8 latents, 16x16 images. ``released``: as the released SD3 is shaped where single-file readers rely
    on it: CLIP-L and CLIP-G of different widths (32, 48; diffusers tells them apart by width), CLIP-L's
    projection the identity, a VAE without quant convs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    widths, joint = ((32, 48), 96) if released else ((32, 32), 64)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=joint, pooled_projection_dim=sum(widths))
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035,
                    **({"use_quant_conv": False, "use_post_quant_conv": False} if released else {}))
    text_encoder = CLIPTextModelWithProjection(_clip_config(widths[0], widths[0]))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(widths[1], widths[1]))
    if released:
        with torch.no_grad():
            text_encoder.text_projection.weight.copy_(torch.eye(widths[0]))
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=build_tiny_t5_encoder(d_model=joint) if t5 else None,
                                    tokenizer_3=build_tiny_t5_tokenizer() if t5 else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sdxl_pipeline(folder: Path, released: bool = False) -> Path:
    """An SDXL-layout pipeline folder: two CLIP encoders (hidden states concatenated to 64), the
    second's pooled projection, six time ids; Euler scheduler as SDXL ships; 8x8 latents, 16x16 images.
    ``released``: as the released SDXL is shaped where tools rely on it: encoders of different widths (32, 48,
    as 768 and 1280: diffusers' from_single_file tells the two apart by width; the second GELU, as OpenCLIP),
    attention in the deeper block only (down: plain, cross; up: cross, plain), linear projections."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    width_2 = 48 if released else 32
    down, up = ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=32 + width_2, attention_head_dim=2,
                                down_block_types=down[::-1] if released else down,
                                up_block_types=up[::-1] if released else up, addition_embed_type="text_time",
                                use_linear_projection=released,
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = _tiny_vae(scaling_factor=0.13025)
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(width_2, hidden_act="gelu" if released else "quick_gelu"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                     unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_dit_pipeline(folder: Path) -> Path:
    """A DiT-layout pipeline folder: 1000 ImageNet classes plus the null class 1000, learned sigma
    (8 output channels for 4 latent ones), DDIM trailing; 8x8 latents, 16x16 images."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
                ).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_pixart_pipeline(folder: Path, sigma: bool = False) -> Path:
    """A PixArt-alpha-layout pipeline folder (``sigma``: a PixArtSigmaPipeline's): T5 states with
    their attention mask, learned sigma, DDIM trailing; 8x8 latents, 16x16 images."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4, out_channels=8,
                                           cross_attention_dim=16, attention_bias=True, num_embeds_ada_norm=1000,
                                           activation_fn="gelu-approximate", norm_type="ada_norm_single",
                                           norm_elementwise_affine=False, norm_eps=1e-6)
    (PixArtSigmaPipeline if sigma else PixArtAlphaPipeline)(tokenizer=build_tiny_t5_tokenizer(), text_encoder=build_tiny_t5_encoder(), vae=_tiny_vae(),
                        transformer=transformer, scheduler=DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
                        ).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_flux_pipeline(folder: Path, guidance_embeds: bool = True) -> Path:
    """A Flux.1-layout pipeline folder (dev: guidance-distilled; ``guidance_embeds=False``: schnell):
    CLIP pooled + T5 states, 2x2-packed 4-channel latents, dynamically shifted flow; 8x8 latents, 16x16 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    tokenizer = build_tiny_clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src")
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_clip_config()), tokenizer=tokenizer,
                 text_encoder_2=build_tiny_t5_encoder(), tokenizer_2=build_tiny_t5_tokenizer(), transformer=transformer
                 ).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny PixArt-alpha pipeline folder (built once per session; do not modify)."""
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "tiny-pixart")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny guidance-distilled Flux pipeline folder (built once per session; do not modify)."""
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL pipeline folder (built once per session; do not modify)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_released_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL folder shaped as the release (``build_tiny_sdxl_pipeline(released=True)``)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-released") / "tiny-sdxl", released=True)


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny DiT pipeline folder (built once per session; do not modify)."""
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "tiny-dit")


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

    # an empty user cache: the FID reference of this data is computed, reading it batch by batch
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    path = tmp_path / "digits.safetensors"
    save_file({"images": data_mod.load_digits(split="train")[0][:300].contiguous()}, str(path))
    read_sizes: list[int] = []
    check = data_mod._check
    monkeypatch.setattr(data_mod, "_check", lambda images, *a: read_sizes.append(len(images)) or check(images, *a))
    monkeypatch.setattr(data_mod, "load_data", lambda *a: pytest.fail("load_data read the whole data set"))
    return path, read_sizes


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block: the in-process run a multi-process one is
    compared with bit for bit must sum in the same order (accelerate_launch's processes run 1 thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    """A free local port, not torchrun's fixed 29500: xdist workers launch side by side."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(args: list[str], num_processes: int = 2, timeout: int = 600):
    """``accelerate launch`` (CPU, gloo) of ``python -m pgraft_cli ARGS`` on ``num_processes`` processes;
    the ``launch`` module itself, not the ``accelerate`` script, which imports every other subcommand
    too (0.8 CPU s more)."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
         "--main_process_port", str(_free_port()),
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pgraft_cli", *args],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def _forked_rank(rank: int, args: list[str], world: int, port: int, folder: Path) -> None:
    """One process of ``forked_launch``: the variables torchrun and ``accelerate launch --multi_gpu`` set,
    accelerate's process state reset (the fork copied this process's single-process one), one thread."""
    from accelerate.state import AcceleratorState, GradientState

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      ACCELERATE_MIXED_PRECISION="no", ACCELERATE_DYNAMO_BACKEND="NO")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    (out, err), code = cli_in_process(*args)
    (folder / f"{rank}.out").write_text(out)
    (folder / f"{rank}.err").write_text(err)
    sys.exit(code)  # a non-zero code ends this rank, the others are stopped and the launch reports it


def forked_launch(args: list[str], num_processes: int = 2, timeout: int = 120) -> "subprocess.CompletedProcess[str]":
    """``pgraft ARGS`` on ``num_processes`` CPU processes (gloo) forked from this one, as ``accelerate_launch``
    runs it but without ~13 CPU s of three new interpreters' start-up and imports: each rank runs the
    console entry in process (``cli_in_process``). stdout and stderr are the ranks' in rank order; the
    return code is the first failing rank's (1 for an uncaught exception, its traceback in stderr). ``timeout``:
    the two launches of test_correct and test_finetune_cli take 6-7 s wall at load 4 on two cores; 120 s
    leaves room for a busy box yet frees an xdist worker from a hung rank in two minutes, not ten."""
    import tempfile
    import time

    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        context = start_processes(_forked_rank, args=([str(a) for a in args], num_processes, _free_port(), folder),
                                  nprocs=num_processes, join=False, start_method="fork")
        code, crash = 0, ""
        try:
            deadline = time.monotonic() + timeout
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # True once every rank is done
                if time.monotonic() >= deadline:
                    for process in context.processes:
                        process.kill()
                    raise subprocess.TimeoutExpired(["pgraft", *args], timeout)
        except ProcessExitedException as exc:
            code = exc.exit_code
        except ProcessRaisedException as exc:
            code, crash = 1, str(exc)
        finally:  # a rank that raised left its traceback in the temporary folder; the join read it
            for name in context.error_files:
                Path(name).unlink(missing_ok=True)

        def read(suffix: str) -> str:
            return "".join(p.read_text() for p in (folder / f"{k}{suffix}" for k in range(num_processes)) if p.exists())

        return subprocess.CompletedProcess(["pgraft", *args], code, read(".out"), read(".err") + crash)


_GET_COMMAND = typer.main.get_command


@functools.lru_cache(maxsize=None)
def click_command(app: Any) -> Any:
    """The click command of a typer ``app``: typer rebuilds it on every call of the app (~25 ms, each
    command's signature and type hints read again); a ``pgraft`` process builds it once."""
    return _GET_COMMAND(app)


def cli_in_process(*args: str) -> tuple[tuple[str, str], int]:
    """``pgraft ARGS`` through the console entry (``cli.main``) in this process, without a new
    interpreter's start-up and imports: ((stdout, stderr), exit code)."""
    import io

    from pgraft_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    old, sys.argv = sys.argv, ["pgraft", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                pytest.MonkeyPatch.context() as mp:
            mp.setattr(typer.main, "get_command", click_command)  # built once, as in one process of `pgraft`
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return (out.getvalue(), err.getvalue()), code


def cli_run(*args: Any, cwd: Optional[Path] = None, threads: int = 1) -> "subprocess.CompletedProcess[str]":
    """``pgraft ARGS`` in this process (``cli_in_process``) as a ``subprocess.CompletedProcess``, in ``cwd``
    with ``threads`` torch threads and an 80-column terminal, as the subprocess runs the tests had used
    (OMP_NUM_THREADS=1, COLUMNS=80): for tests that are not about a fresh interpreter, without its start-up."""
    argv = [str(a) for a in args]
    with pytest.MonkeyPatch.context() as mp, torch_threads(threads):
        mp.setenv("COLUMNS", "80")
        if cwd is not None:
            mp.chdir(cwd)
        (out, err), code = cli_in_process(*argv)
    return subprocess.CompletedProcess(["pgraft", *argv], code, out, err)
