"""pgraft export: the folders sample as `pgraft sample` does, adapters load in diffusers, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import cli_run
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError
from pgraft_cli.io.checkpoints import base_info_of, load_model, save_corrected, save_finetuned
from pgraft_cli.io.recipes import FinetuneConfig
from pgraft_cli.io.runstore import RunStore
from pgraft_cli.models.corrector import NoiseCorrector
from pgraft_cli.stages.finetune import prepare_tuning
from pgraft_cli.stages.sample import initial_noise

runner = CliRunner()
PROMPTS = ["a red cube", "two cats"]


def _tuned_file(tmp_path, source, cutoff, lora_rank=2, tuned_guidance="reapply", name="tuned"):
    """A fine-tune file whose tuned part visibly differs from the base (random LoRA B, or scaled weights)."""
    model = load_model(str(source))
    cfg = FinetuneConfig(cutoff=cutoff, lora_rank=lora_rank, lora_alpha=2 * lora_rank, tuned_guidance=tuned_guidance)
    net = prepare_tuning(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if lora_rank and "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif not lora_rank:
                p.mul_(0.8)
    return save_finetuned(tmp_path / f"{name}.safetensors", model, base_info_of(model), cfg, {}, {}), model


def _corrected_file(tmp_path, kind="flow"):
    """A corrector for 4 digits steps: a random flow UNet, or a random Gaussian map (``gaussian``: L lower
    triangular with a positive diagonal; ``gaussian-diag``: std in (0.5, 1.5))."""
    from diffusers import UNet2DModel

    base = load_model("digits")
    torch.manual_seed(0)
    if kind == "mlp":
        from pgraft_cli.models.corrector import MLPFlow

        config = {"sample_shape": [1, 16, 16], "width": 32, "blocks": 1}
        corrector = NoiseCorrector("mlp", 4, 2, network=MLPFlow(**config).eval(), model_config=config)
    elif kind in ("flow", "flow-heun"):
        config = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, sample_size=16, in_channels=1,
                      out_channels=1, down_block_types=["DownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "UpBlock2D"])
        corrector = NoiseCorrector("flow", 4, 2, "heun" if kind == "flow-heun" else "euler",
                                   network=UNet2DModel(**config).eval(), model_config=config)
    else:
        dim = 16 * 16
        mean = 0.3 * torch.randn(dim, dtype=torch.float64)
        chol = torch.eye(dim, dtype=torch.float64) + 0.05 * torch.randn(dim, dim, dtype=torch.float64).tril(-1)
        corrector = NoiseCorrector(kind, 4, 0, mean=mean, chol=chol if kind == "gaussian" else None,
                                   std=0.5 + torch.rand(dim, dtype=torch.float64) if kind == "gaussian-diag" else None)
    return save_corrected(tmp_path / "corrected.safetensors", corrector, base, {}, {})


def _export(checkpoint, out, *args):
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _pgraft_sample(tmp_path, checkpoint, num, steps, *args):
    """The final model-space states of `pgraft sample` (seed 0), in index order."""
    run = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    result = runner.invoke(app, ["sample", str(checkpoint), "--num", str(num), "--steps", str(steps), "--batch-size", "16",
                                 "--run-dir", str(run), "--out", str(run / "png"), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return RunStore(run, is_main=False).stage("sample").tensors("samples")["samples"]


def _assert_same(got, want):
    """Equal to 1e-5 of the samples' scale (random tiny SD latents reach |x| ~ 50; float32 rounds at ~1e-6 of it)."""
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def _exported_sample(folder, num, steps, noise=None, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    if noise is None:
        noise = initial_noise(0, list(range(num)), (pipe.unet.config.in_channels,) + (pipe.unet.config.sample_size,) * 2)
    with torch.no_grad():
        return pipe(num_inference_steps=steps, latents=noise, output_type="latent", **kw).images.float(), pipe


# ----------------------------------------------------------------------------------------------
# The exported pipeline samples as `pgraft sample`


@pytest.mark.parametrize("kind", ["plain", "corrected", "corrected-heun", "gaussian", "gaussian-diag", "lora-pgraft",
                                  "full-pgraft"])
def test_exported_digits_pipeline_gives_the_images_of_pgraft_sample(tmp_path, kind):
    checkpoint = {"plain": lambda: "digits", "corrected": lambda: _corrected_file(tmp_path),
                  "corrected-heun": lambda: _corrected_file(tmp_path, "flow-heun"),
                  "gaussian": lambda: _corrected_file(tmp_path, "gaussian"),
                  "gaussian-diag": lambda: _corrected_file(tmp_path, "gaussian-diag"),
                  "lora-pgraft": lambda: _tuned_file(tmp_path, "digits", 0.5)[0],
                  "full-pgraft": lambda: _tuned_file(tmp_path, "digits", 0.5, lora_rank=0)[0]}[kind]()
    summary = _export(checkpoint, tmp_path / "pipe")
    assert summary["pipeline"] == "PgraftPipeline" and "pipeline.py" in summary["files"]
    want = _pgraft_sample(tmp_path, checkpoint, 3, 4)
    got, pipe = _exported_sample(tmp_path / "pipe", 3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if kind != "plain":  # the composition changes the images (so the comparison above is not vacuous)
        base = _pgraft_sample(tmp_path, "digits", 3, 4)
        assert float((base - want).abs().max()) > 1e-2
    images = pipe(num_inference_steps=4, latents=initial_noise(0, [0], (1, 16, 16)), output_type="pt").images
    torch.testing.assert_close(images, ((want[:1] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [4, 7])  # 7 does not divide T = 1000: diffusers' DDIM steps off pgraft's grid
def test_graft_lora_at_cutoff_zero_is_a_plain_stable_diffusion_folder(tmp_path, tiny_sd_dir, steps):
    from diffusers import StableDiffusionPipeline

    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.0)
    summary = _export(checkpoint, tmp_path / "pipe")
    assert summary["pipeline"] == "StableDiffusionPipeline" and "pipeline.py" not in summary["files"]
    assert "defaults to guidance_scale=7.5; pgraft samples at 5" in summary["note"]
    want = _pgraft_sample(tmp_path, checkpoint, 2, steps, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--guidance-scale", "3")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(0, [0, 1], (4, 8, 8))
    got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, latents=noise, output_type="latent").images
    _assert_same(got, want)


def test_pgraft_text_model_with_unguided_tuned_segment_exports_its_composed_sampler(tmp_path, tiny_sd_dir):
    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.5, tuned_guidance="none")
    summary = _export(checkpoint, tmp_path / "pipe")
    assert summary["pipeline"] == "PgraftPipeline"
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--guidance-scale", "3")
    got, _ = _exported_sample(tmp_path / "pipe", 2, 4, prompt=PROMPTS, guidance_scale=3.0)
    _assert_same(got, want)


def test_class_guided_model_exports_a_pipeline_guided_against_its_null_class(tmp_path):
    from test_finetune import _null_class_model

    checkpoint = _null_class_model(tmp_path)
    assert _export(checkpoint, tmp_path / "pipe")["pipeline"] == "PgraftPipeline"
    want = _pgraft_sample(tmp_path, checkpoint, 3, 4, "--class", "1", "--guidance-scale", "2.5")
    got, _ = _exported_sample(tmp_path / "pipe", 3, 4, class_labels=[1, 1, 1], guidance_scale=2.5)
    _assert_same(got, want)  # random weights: |x| ~ 500
    unguided, _ = _exported_sample(tmp_path / "pipe", 3, 4, class_labels=[1, 1, 1])
    assert float((unguided - want).abs().max()) > 1e-3  # guidance changes the images: the match above is not vacuous


def test_a_plain_pixel_model_exports_the_pgraft_pipeline_on_pgraft_grid_for_any_step_count(tmp_path, unet_pipeline_dir):
    """DDIMPipeline forces diffusers' DDIM, which steps to t - T // N: off pgraft's grid at N = 7."""
    model = unet_pipeline_dir("ddpm", prediction_type="v_prediction")  # epsilon: random weights saturate every pixel
    assert _export(model, tmp_path / "pipe")["pipeline"] == "PgraftPipeline"
    want = _pgraft_sample(tmp_path, model, 3, 7)
    got, _ = _exported_sample(tmp_path / "pipe", 3, 7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Single file


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_in_from_single_file_and_gives_the_images_of_pgraft_sample(tmp_path, request, family):
    """SD 1.x and SDXL with a LoRA fused, SD 2.x (OpenCLIP keys, v-prediction) with a full fine-tune; diffusers
    takes the file with the tiny folder as its config, and pgraft's grid (DDIM trailing, alpha = 1 at the end)."""
    import diffusers
    from diffusers import DDIMScheduler

    from conftest import build_tiny_sd_pipeline

    base = {"sd1": lambda: request.getfixturevalue("tiny_sd_dir"),
            "sd2": lambda: build_tiny_sd_pipeline(tmp_path / "sd2", sd2=True),
            "sdxl": lambda: request.getfixturevalue("tiny_sdxl_released_dir")}[family]()
    checkpoint, _ = _tuned_file(tmp_path, base, 0.0, lora_rank=0 if family == "sd2" else 2)
    summary = _export(checkpoint, tmp_path / "sf", "--format", "single-file")
    assert summary["files"] == ["model.safetensors"]
    assert summary["layout"].split()[:2] == {"sd1": ["SD", "1.x"], "sd2": ["SD", "2.x"], "sdxl": ["SDXL", "(CLIP-L,"]}[family]
    cls = getattr(diffusers, "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    pipe = cls.from_single_file(str(tmp_path / "sf" / "model.safetensors"), config=str(base), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",  # SDXL ships Euler
                                               set_alpha_to_one=True, steps_offset=0, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, *prompts)
    got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=initial_noise(0, [0, 1], (4, 8, 8)),
               output_type="latent").images
    _assert_same(got, want)
    assert float((want - _pgraft_sample(tmp_path, base, 2, 4, *prompts)).abs().max()) > 1e-3  # the tune is in the file


def test_single_file_keys_of_full_size_sd_networks_convert_back_through_diffusers(tmp_path):
    """SD 1.5 / 2.1 / XL sized UNets and an SD VAE (on the meta device): the original keys diffusers' own converter
    reads back to every diffusers key, and the ones known from the released checkpoints are there."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from pgraft_cli.io.single_file import unet_to_single_file, vae_to_single_file

    sd = ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
          "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_in.weight",
          "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias")
    xl = ("label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.3.0.op.weight", "output_blocks.2.2.conv.weight",
          "output_blocks.5.2.conv.weight", "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
          "output_blocks.8.0.skip_connection.weight", "middle_block.1.transformer_blocks.9.ff.net.2.bias")
    with init_empty_weights():
        unets = [(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), sd),
                 (UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                       use_linear_projection=True), sd),
                 (UNet2DConditionModel(block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                       transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                       use_linear_projection=True, addition_embed_type="text_time",
                                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816), xl)]
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
    for unet, known in unets:
        state = unet.state_dict()
        ldm = unet_to_single_file(state, 2)
        assert {f"model.diffusion_model.{k}" for k in known} <= set(ldm)
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert set(back) == set(state) and all(back[k] is state[k] for k in state)
    state = vae.state_dict()
    ldm = vae_to_single_file(state)
    assert {f"first_stage_model.{k}" for k in ("decoder.up.3.upsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",
            "decoder.up.0.block.2.conv2.weight", "decoder.norm_out.bias", "post_quant_conv.weight")} <= set(ldm)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert set(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == set(state)


def test_sd3_single_file_loads_in_from_single_file_and_gives_the_images_of_pgraft_sample(tmp_path, tiny_sd3_dir):
    """SD3 shaped as released (CLIP-L and CLIP-G of different widths, T5) with a LoRA fused: diffusers' own
    from_single_file reads every network of the file back exactly, and samples the tuned model's images."""
    from diffusers import StableDiffusion3Pipeline

    from conftest import build_tiny_sd3_pipeline
    from pgraft_cli.io.export import tuned_network

    base = build_tiny_sd3_pipeline(tmp_path / "sd3", t5=True, released=True)
    checkpoint, _ = _tuned_file(tmp_path, base, 0.0)
    summary = _export(checkpoint, tmp_path / "sf", "--format", "single-file")
    assert summary["files"] == ["model.safetensors"] and "note" not in summary
    assert summary["layout"] == "SD3 medium (MMDiT, VAE, CLIP-L, CLIP-G, T5-XXL)"
    pipe = StableDiffusion3Pipeline.from_single_file(str(tmp_path / "sf" / "model.safetensors"), config=str(base),
                                                     local_files_only=True)
    want = {"transformer": tuned_network(load_model(str(checkpoint))).state_dict()}
    ref = StableDiffusion3Pipeline.from_pretrained(str(base))
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        got, expected = getattr(pipe, part).state_dict(), want.get(part) or getattr(ref, part).state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), part
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder_3.eval()  # diffusers 0.42 builds a single file's T5 in training mode (dropout on)
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, *prompts)
    with torch.no_grad():  # pgraft's grid: uniform in t, then shifted (the scheduler shifts the sigmas given)
        got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, sigmas=torch.linspace(1, 0, 5)[:-1].tolist(),
                   latents=initial_noise(0, [0, 1], (4, 8, 8)), output_type="latent").images
    _assert_same(got, want)
    assert float((want - _pgraft_sample(tmp_path, base, 2, 4, *prompts)).abs().max()) > 1e-3  # the tune is in the file
    # A CLIP-L projection other than SD3's identity is written, with a note that single-file readers drop it.
    assert "replace it by the identity" in _export(tiny_sd3_dir, tmp_path / "sf2", "--format", "single-file")["note"]


def _sd3_transformers():
    """(SD3Transformer2DModel on the meta device, the model type diffusers infers from its file) for SD3 medium,
    SD3.5 medium (q/k RMSNorm, dual attention in blocks 0-12) and SD3.5 large (q/k RMSNorm), sized as released."""
    from diffusers import SD3Transformer2DModel

    common = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                  joint_attention_dim=4096, pooled_projection_dim=2048)
    sizes = [("sd3", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)),
             ("sd35_medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                  pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
             ("sd35_large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                 pos_embed_max_size=192, qk_norm="rms_norm"))]
    with torch.device("meta"):
        return [(SD3Transformer2DModel(**common, **size), kind) for kind, size in sizes]


def test_sd3_mmdit_keys_of_full_size_sd3_and_sd35_convert_back_through_diffusers():
    """At the released sizes (meta device): diffusers infers the model type pgraft's detection names from the
    file's keys and shapes, and its own converter takes every key back to the diffusers key of that shape."""
    from diffusers.loaders.single_file_utils import (convert_sd3_transformer_checkpoint_to_diffusers,
                                                     infer_diffusers_model_type)

    from pgraft_cli.io.single_file import (SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, UNET_PREFIX, detect_layout,
                                           mmdit_to_single_file)

    layouts = {"sd3": SD3_MEDIUM, "sd35_medium": SD35_MEDIUM, "sd35_large": SD35_LARGE}
    for transformer, kind in _sd3_transformers():
        state = transformer.state_dict()
        original = {UNET_PREFIX + k: v for k, v in mmdit_to_single_file(state).items()}
        assert infer_diffusers_model_type(original) == kind and detect_layout(original) is layouts[kind]
        assert original[UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * state[
            "transformer_blocks.0.attn.to_q.weight"].shape[0], state["transformer_blocks.0.attn.to_q.weight"].shape[1])
        back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
        assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state), kind


def test_sd3_mmdit_round_trips_through_diffusers_converter_value_for_value():
    """Every feature at once (q/k RMSNorm, dual attention, the text stream ending in the last block), random
    values: diffusers' converter undoes pgraft's qkv stacking and (shift, scale) swaps exactly."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from pgraft_cli.io.single_file import mmdit_to_single_file, swap_halves

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=32, pooled_projection_dim=32, qk_norm="rms_norm",
                                        dual_attention_layers=(0, 1))
    state = {k: torch.randn(v.shape) for k, v in transformer.state_dict().items()}
    original = mmdit_to_single_file(state)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], swap_halves(state["norm_out.linear.weight"]))
    assert torch.equal(original["joint_blocks.1.context_block.adaLN_modulation.1.bias"],
                       state["transformer_blocks.1.norm1_context.linear.bias"])  # swapped in the last block only
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_single_file_refuses_other_families_and_composed_samplers_in_one_line(tmp_path, tiny_sd_dir, tiny_pixart_dir):
    from pgraft_cli.io.export import ExportError
    from pgraft_cli.pipelines.export import ExportOptions, export

    with pytest.raises(ExportError, match="--dtype 'int8' is unknown; use one of float32, float16, bfloat16"):
        export("digits", tmp_path / "a", ExportOptions(dtype="int8"))
    single = ExportOptions(format="single-file")
    with pytest.raises(ExportError, match=r"supports Stable Diffusion 1\.x/2\.x/XL/3/3\.5 and Flux\.1 .* use --format diffusers") as e:
        export("digits", tmp_path / "a", single)
    with pytest.raises(ExportError, match=r"is a PixArtAlphaPipeline: use --format diffusers") as e3:
        export(str(tiny_pixart_dir), tmp_path / "a", single)  # PixArt has no single-file layout
    assert "\n" not in str(e3.value)
    pgraft, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.5)
    with pytest.raises(ExportError, match=r"cannot be one single file: the tuned network runs above t = 0\.5") as e2:
        export(str(pgraft), tmp_path / "b", single)
    assert "\n" not in str(e.value) + str(e2.value) and sorted(p.name for p in tmp_path.iterdir()) == ["tuned.safetensors"]


# ----------------------------------------------------------------------------------------------
# --dtype


@pytest.mark.parametrize("fmt, dtype, recipe_dtype", [("diffusers", None, None), ("diffusers", "float16", None),
                                                      ("single-file", "bfloat16", None), ("lora", "float16", None),
                                                      ("single-file", None, "float16")])
def test_dtype_sets_the_written_weights_dtype(tmp_path, tiny_sd_dir, fmt, dtype, recipe_dtype):
    """--dtype, else the recipe's model.dtype (float32 unless set; it was ignored, the help said "the checkpoint's")."""
    from safetensors import safe_open

    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.0)
    _export(checkpoint, tmp_path / "out", "--format", fmt, *(["--dtype", dtype] if dtype else []),
            *(["--set", f"model.dtype={recipe_dtype}"] if recipe_dtype else []))
    files = sorted((tmp_path / "out").rglob("*.safetensors"))
    assert len(files) >= (3 if fmt == "diffusers" else 1)
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype or recipe_dtype or "float32")}, file


# ----------------------------------------------------------------------------------------------
# LoRA files


def _unet_output(unet, seed=0):
    """The UNet on random latents and text states (and, for SDXL, a random pooled embedding and time ids)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, c.cross_attention_dim, generator=g)
    added = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    with torch.no_grad():
        return unet(x, torch.tensor([700.0, 300.0]), encoder_hidden_states=embeds, **added).sample


@pytest.mark.parametrize("family, layout", [("sd", "diffusers"), ("sd", "kohya"), ("sdxl", "diffusers"),
                                            ("sdxl", "kohya")])
def test_lora_round_trip_through_load_lora_weights_changes_the_output_as_pgraft_adapter_does(tmp_path, request, family,
                                                                                             layout):
    """SDXL's kohya file names the original UNet's modules (``lora_unet_input_blocks_...``), as kohya's own."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from pgraft_cli.io.export import KOHYA_FILE

    base = request.getfixturevalue("tiny_sdxl_released_dir" if family == "sdxl" else "tiny_sd_dir")
    checkpoint, _ = _tuned_file(tmp_path, base, 0.0)
    summary = _export(checkpoint, tmp_path / "lora", "--format", "lora", "--lora-format", layout)
    assert summary["alpha"] == 4 and summary["rank"] == 2  # alpha != rank: the scale must travel with the file
    if layout == "kohya":
        with safe_open(str(tmp_path / "lora" / KOHYA_FILE), "pt") as f:
            heads = {k.removeprefix("lora_unet_").split("_")[0] for k in f.keys()}
        assert heads == ({"input", "middle", "output"} if family == "sdxl" else {"down", "mid", "up"})
    pgraft = load_model(str(checkpoint))
    want = _unet_output(pgraft.network)
    pipe = DiffusionPipeline.from_pretrained(str(base))
    before = _unet_output(pipe.unet)
    assert float((want - before).abs().max()) > 1e-3
    if layout == "diffusers":  # diffusers 0.35.0 reads rank_pattern from any adapter metadata (KeyError without)
        with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        patterns = {k.removeprefix("unet."): v for k, v in meta.items() if k.endswith("_pattern")}
        assert patterns == {"rank_pattern": {}, "alpha_pattern": {}}
    pipe.load_lora_weights(str(tmp_path / "lora"), **({"weight_name": KOHYA_FILE} if layout == "kohya" else {}))
    torch.testing.assert_close(_unet_output(pipe.unet), want, atol=1e-5, rtol=0)


def test_the_exported_pipelines_init_annotations_are_what_older_diffusers_can_type_check():
    """diffusers 0.35 type-checks what from_pretrained loads against the annotations of the pipeline's __init__,
    reading each as a class, a Union or a list/dict; a string annotation (``from __future__ import annotations``)
    or ``typing.Any`` before Python 3.11 ended every exported folder's from_pretrained with KeyError: 'autocast'."""
    import inspect
    from typing import Union, get_origin

    from pgraft_cli.io.export_pipeline import PgraftPipeline

    for name, parameter in inspect.signature(PgraftPipeline.__init__).parameters.items():
        a = parameter.annotation
        readable = (a is inspect.Parameter.empty or (inspect.isclass(a) and a.__module__ != "typing")
                    or get_origin(a) in (Union, list, dict))
        assert readable, f"{name}: {a!r}"


def test_kept_adapter_loads_onto_the_exported_base_pipeline(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.0)
    summary = _export(checkpoint, tmp_path / "pipe", "--keep-adapter")
    assert summary["lora"] == "pytorch_lora_weights.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(StableDiffusionPipeline.from_pretrained(
        str(tiny_sd_dir)).unet), atol=0, rtol=0)  # the base, unfused
    pipe.load_lora_weights(str(tmp_path / "pipe"))
    torch.testing.assert_close(_unet_output(pipe.unet), _unet_output(load_model(str(checkpoint)).network),
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Without pgraft


BLOCK_PGRAFT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'pgraft_cli':
            raise ImportError('pgraft_cli is blocked in this process')
sys.meta_path.insert(0, Block())
import json, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
noise = torch.load(sys.argv[2])
out = pipe(num_inference_steps=4, latents=noise, output_type='latent', **json.loads(sys.argv[4])).images
assert 'pgraft_cli' not in sys.modules
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("corrector", ["flow", "gaussian"])
def test_an_exported_folder_samples_in_a_fresh_process_where_pgraft_is_not_importable(tmp_path, corrector):
    checkpoint = _corrected_file(tmp_path, corrector)
    _export(checkpoint, tmp_path / "pipe")
    noise = initial_noise(0, [0, 1], (1, 16, 16))
    got, pipe = _exported_sample(tmp_path / "pipe", 2, 4)
    assert not type(pipe.corrector).__module__.startswith("pgraft_cli")  # the class written beside the weights
    torch.testing.assert_close(_sample_without_pgraft(tmp_path, noise, {}), got, atol=0, rtol=0)


def _sample_without_pgraft(tmp_path, noise, kwargs):
    """The exported folder ``tmp_path/pipe`` sampled from ``noise`` in a fresh process that cannot import pgraft."""
    torch.save(noise, tmp_path / "noise.pt")
    result = subprocess.run([sys.executable, "-c", BLOCK_PGRAFT, str(tmp_path / "pipe"), str(tmp_path / "noise.pt"),
                             str(tmp_path / "out.pt"), json.dumps(kwargs)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow
def test_a_composed_flux_folder_samples_as_pgraft_in_a_fresh_process_where_pgraft_is_not_importable(tmp_path,
                                                                                                   tiny_flux_dir):
    """Flux dev with a text-conditioned flow corrector: TextFlowCorrector comes from corrector/pipeline.py."""
    checkpoint = _text_corrector(tmp_path, tiny_flux_dir, "flow")
    _export(checkpoint, tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["corrector"] == ["pipeline", "TextFlowCorrector"] and index["_class_name"] == ["pipeline", "PgraftPipeline"]
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    _assert_same(_sample_without_pgraft(tmp_path, initial_noise(0, [0, 1], FLUX_NOISE), {"prompt": PROMPTS}), want)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, nothing overwritten


def _fails(*args, cwd=None):
    result = cli_run("export", *args, cwd=cwd)
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.slow
def test_bad_exports_fail_in_one_line_and_leave_out_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _fails("digits", "--out", out)
    assert "--format 'onnx' is unknown" in _fails("digits", "--out", tmp_path / "a", "--format", "onnx")
    assert "no LoRA adapter" in _fails("digits", "--out", tmp_path / "b", "--format", "lora")
    assert "single-file" in _fails("digits", "--out", tmp_path / "c", "--format", "single-file")
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    summary = _export("digits", out, "--force")
    assert not (out / "keep.txt").exists() and "pipeline.py" in summary["files"]


def test_an_mlp_corrector_is_refused_in_one_line_not_exported_without_it(tmp_path):
    """diffusers cannot save the MLP corrector as a pipeline component: the folder would sample the bare base."""
    message = _fails(str(_corrected_file(tmp_path, "mlp")), "--out", tmp_path / "out")
    assert "mlp kind" in message and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# The README's Export section, run as written


def _readme_export_blocks():
    """The fenced code blocks of README.md's Export section, in order, as (language, text)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_export_round_trip_runs_as_written(tmp_path, tiny_sd_dir, monkeypatch):
    """Every `pgraft export` line of the section through the CLI, then each Python block (the base folder the
    text calls ./sd2-base is the tiny SD one): the adapter and the single file give pgraft's network output."""
    import shlex

    blocks = _readme_export_blocks()
    commands = [shlex.split(line, comments=True) for lang, text in blocks if lang == "bash"
                for line in text.splitlines() if line.startswith("pgraft export")]
    assert len(commands) == 4 and {c[c.index("--format") + 1] for c in commands if "--format" in c} == {"lora",
                                                                                                      "single-file"}
    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.0)
    assert checkpoint.name == "tuned.safetensors" and all(c[2] == checkpoint.name for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, f"{shlex.join(command)}: {result.output}"
    want = _unet_output(load_model(str(checkpoint)).network)
    checked = 0
    for lang, text in blocks:
        if lang != "python":
            continue
        scope: dict = {}
        exec(compile(text.replace("./sd2-base", str(tiny_sd_dir)), "README.md", "exec"), scope)
        if "images" in scope:
            assert len(scope["images"]) == 1 and scope["images"][0].size == (16, 16)
        else:  # the adapter loaded onto the base, or the single file: pgraft's tuned network
            torch.testing.assert_close(_unet_output(scope["pipe"].unet), want, atol=1e-5, rtol=0)
        checked += 1
    assert checked == 3
# Families: what each exports to, and what it refuses


def _flux_output(transformer):
    g = torch.Generator().manual_seed(0)
    x, text, pooled = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return transformer(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.tensor([0.7]),
                           img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5])).sample


def test_flux_lora_loads_through_flux_pipeline_load_lora_weights(tmp_path, tiny_flux_dir):
    from diffusers import FluxPipeline

    checkpoint, _ = _tuned_file(tmp_path, tiny_flux_dir, 0.0)
    _export(checkpoint, tmp_path / "lora", "--format", "lora")
    want = _flux_output(load_model(str(checkpoint)).network)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    assert float((want - _flux_output(pipe.transformer)).abs().max()) > 1e-3
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_flux_output(pipe.transformer), want, atol=1e-5, rtol=0)


def test_flux_single_file_is_the_fused_transformer_in_bfl_layout_and_samples_as_pgraft(tmp_path, tiny_flux_dir,
                                                                                      monkeypatch):
    """The LoRA fused into the transformer, bare BFL keys (no text encoder or VAE, as flux1-dev.safetensors):
    diffusers' from_single_file reads it (its converter at the tiny width), and in the folder's pipeline it
    samples the tuned model's images."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from safetensors import safe_open

    from pgraft_cli.io.single_file import FLUX_DEV, detect_layout
    from test_single_file import _flux_converter_at_the_file_width

    monkeypatch.setitem(SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn",
                        _flux_converter_at_the_file_width())
    checkpoint, _ = _tuned_file(tmp_path, tiny_flux_dir, 0.0)
    summary = _export(checkpoint, tmp_path / "sf", "--format", "single-file")
    assert summary["files"] == ["model.safetensors"] and summary["layout"].startswith("Flux.1-dev")
    assert "transformer alone" in summary["note"]
    file = tmp_path / "sf" / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    assert detect_layout(keys) is FLUX_DEV and all(k.split(".")[0] in (
        "double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
        for k in keys)
    transformer = FluxTransformer2DModel.from_single_file(str(file), config=str(tiny_flux_dir), subfolder="transformer",
                                                          local_files_only=True)
    want = _flux_output(load_model(str(checkpoint)).network)
    torch.testing.assert_close(_flux_output(transformer), want, atol=1e-5, rtol=0)
    assert float((want - _flux_output(load_model(str(tiny_flux_dir)).network)).abs().max()) > 1e-3
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    got = _pgraft_sample(tmp_path, file, 2, 3, "--config", tiny_flux_dir, *prompts)
    _assert_same(got, _pgraft_sample(tmp_path, checkpoint, 2, 3, *prompts))


def test_pixart_plain_export_is_its_own_pipeline_and_samples_as_pgraft(tmp_path, tiny_pixart_dir):
    from diffusers import PixArtAlphaPipeline

    checkpoint, _ = _tuned_file(tmp_path, tiny_pixart_dir, 0.0)
    summary = _export(checkpoint, tmp_path / "pipe")
    assert summary["pipeline"] == "PixArtAlphaPipeline" and summary["guidance_scale"] == 5.0
    want = _pgraft_sample(tmp_path, checkpoint, 2, 7, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                          "--guidance-scale", "3")
    pipe = PixArtAlphaPipeline.from_pretrained(str(tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    got = pipe(PROMPTS, num_inference_steps=7, guidance_scale=3.0, latents=initial_noise(0, [0, 1], (4, 8, 8)),
               output_type="latent", use_resolution_binning=False).images
    _assert_same(got, want)


def test_dit_plain_export_carries_its_vae_and_samples_as_pgraft(tmp_path, tiny_dit_dir):
    from diffusers import DiTPipeline

    from pgraft_cli.stages.sample import noise_seed

    summary = _export(tiny_dit_dir, tmp_path / "pipe")
    assert summary["pipeline"] == "DiTPipeline" and "vae/config.json" in summary["files"]
    want = _pgraft_sample(tmp_path, tiny_dit_dir, 2, 7, "--class", "3", "--guidance-scale", "1")
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(noise_seed(0, i)) for i in range(2)]
    got = pipe([3, 3], guidance_scale=1.0, generator=generators, num_inference_steps=7, output_type="np").images
    with torch.no_grad():
        images = load_model(str(tiny_dit_dir)).decode(want)  # in [0, 1]
    assert float(images.std()) > 1e-2
    torch.testing.assert_close(torch.from_numpy(got).permute(0, 3, 1, 2), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart", "dit"])
def test_composed_export_of_sdxl_sd3_pixart_and_dit_gives_the_images_of_pgraft_sample(tmp_path, request, family):
    """A LoRA P-GRAFT at cutoff 0.5, guided: SDXL (pooled embedding, time ids), SD3 (pooled projections, shifted
    flow), PixArt (T5 states and their mask), DiT (class labels against the null class 1000, learned sigma dropped; the images through its VAE)."""
    base = request.getfixturevalue(f"tiny_{family}_dir")
    checkpoint, _ = _tuned_file(tmp_path, base, 0.5)
    assert _export(checkpoint, tmp_path / "pipe")["pipeline"] == "PgraftPipeline"
    cond = {"class_labels": [3, 3]} if family == "dit" else {"prompt": PROMPTS}
    args = ("--class", "3") if family == "dit" else ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, *args, "--guidance-scale", "3")
    got, pipe = _exported_sample(tmp_path / "pipe", 2, 4, guidance_scale=3.0, **cond)
    _assert_same(got, want)
    assert float((want - _pgraft_sample(tmp_path, base, 2, 4, *args, "--guidance-scale", "3")).abs().max()) > 1e-3
    if family == "dit":
        images = pipe(num_inference_steps=4, latents=initial_noise(0, [0, 1], (4, 8, 8)), output_type="pt",
                      guidance_scale=3.0, **cond).images
        with torch.no_grad():
            torch.testing.assert_close(images, load_model(str(checkpoint)).decode(want), atol=1e-5, rtol=0)


FLUX_NOISE = (4, 8, 8)  # the tiny Flux's unpacked latent (16 px images, VAE scale 2)


def _text_corrector(tmp_path, base, kind):
    """A text-conditioned corrector for 4 steps of a tiny text model, as `pgraft correct` fits one on captions: a
    Gaussian whose mean is ``mean + c W`` (c the model's pooled text embedding), or a flow UNet with a class
    embedding ``projection(c)``; random parameters large enough to move every sample."""
    from torch import nn

    from pgraft_cli.io.recipes import CorrectConfig
    from pgraft_cli.stages.correct import corrector_network

    model = load_model(str(base))
    shape, width = model.sample_shape, model.pooled_text([""]).shape[1]
    torch.manual_seed(0)
    dim = shape[0] * shape[1] * shape[2]
    if kind == "gaussian":
        chol = torch.eye(dim) + 0.05 * torch.randn(dim, dim).tril(-1)
        corrector = NoiseCorrector("gaussian", 4, 0, mean=0.3 * torch.randn(dim), chol=chol, conditioning="text",
                                   weight=0.5 * torch.randn(width, dim))
    else:
        network, config = corrector_network(CorrectConfig(corrector="flow", corrector_channels=[8, 16]), shape,
                                            {"class_embed_type": "identity"})
        projection = nn.Linear(width, network.time_embedding.linear_2.out_features)
        corrector = NoiseCorrector("flow", 4, 2, network=network.eval(), model_config=config, conditioning="text",
                                   projection=projection.eval())
    return save_corrected(tmp_path / "corrected.safetensors", corrector, model, {}, {})


@pytest.mark.parametrize("kind", ["dev-pgraft", "schnell-pgraft", "dev-gaussian", "schnell-flow"])
def test_composed_flux_export_gives_the_images_of_pgraft_sample(tmp_path, tiny_flux_dir, kind):
    """Flux dev (distilled guidance 2.5 as its input, recorded by the export) and schnell: a LoRA P-GRAFT at cutoff
    0.5, and a text-conditioned corrector (Gaussian; flow) -> base; packed 2x2 latents, the dynamic shift exp(mu)
    at 16 tokens. Different prompts per row: the corrector takes each prompt's pooled embedding."""
    from conftest import build_tiny_flux_pipeline

    base = tiny_flux_dir if kind.startswith("dev") else build_tiny_flux_pipeline(tmp_path / "schnell", False)
    what = kind.split("-")[1]
    checkpoint = _tuned_file(tmp_path, base, 0.5)[0] if what == "pgraft" else _text_corrector(tmp_path, base, what)
    guidance = ("--set", "sample.distilled_guidance=2.5")
    summary = _export(checkpoint, tmp_path / "pipe", *guidance)
    assert summary["pipeline"] == "PgraftPipeline" and summary["guidance_scale"] == (2.5 if kind.startswith("dev") else 1)
    args = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *guidance)
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, *args)
    got, pipe = _exported_sample(tmp_path / "pipe", 2, 4, noise=initial_noise(0, [0, 1], FLUX_NOISE), prompt=PROMPTS)
    _assert_same(got, want)
    assert float((want - _pgraft_sample(tmp_path, base, 2, 4, *args)).abs().max()) > 1e-3  # the composition shows
    if kind.startswith("dev"):  # the guidance input reaches the network
        other = pipe(PROMPTS, num_inference_steps=4, latents=initial_noise(0, [0, 1], FLUX_NOISE), guidance_scale=6.0,
                     output_type="latent").images
        assert float((other - want).abs().max()) > 1e-3
    images = pipe(PROMPTS, num_inference_steps=4, latents=initial_noise(0, [0, 1], FLUX_NOISE), output_type="pt").images
    with torch.no_grad():
        torch.testing.assert_close(images, load_model(str(checkpoint)).decode(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_a_text_conditioned_corrector_of_sd_sdxl_and_sd3_exports_as_pgraft_samples_it(tmp_path, request, family):
    """The corrector's pooled embedding: SD's CLIP pooler_output (its UNet never reads it), SDXL's text_embeds,
    SD3's pooled projections; guided at 3, as pgraft samples."""
    base = request.getfixturevalue(f"tiny_{family}_dir")
    checkpoint = _text_corrector(tmp_path, base, "gaussian")
    _export(checkpoint, tmp_path / "pipe")
    args = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, *args)
    got, _ = _exported_sample(tmp_path / "pipe", 2, 4, noise=initial_noise(0, [0, 1], (4, 8, 8)), prompt=PROMPTS,
                              guidance_scale=3.0)
    _assert_same(got, want)
    assert float((want - _pgraft_sample(tmp_path, base, 2, 4, *args)).abs().max()) > 1e-3


def test_a_class_conditioned_corrector_is_refused_in_one_line(tmp_path):
    from pgraft_cli.io.export import ExportError
    from pgraft_cli.pipelines.export import ExportOptions, export

    from test_correct_conditioned import _class_flow

    base = load_model(str(_class_flow(tmp_path)))
    dim = 16 * 16
    corrector = NoiseCorrector("gaussian-diag", 4, 0, mean=torch.zeros(10, dim), std=torch.ones(10, dim),
                               conditioning="class")
    checkpoint = save_corrected(tmp_path / "corrected.safetensors", corrector, base, {}, {})
    with pytest.raises(ExportError, match="conditioned on each sample's class") as e:
        export(str(checkpoint), tmp_path / "out", ExportOptions())
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["pixart", "dit", "digits"])
def test_lora_of_a_family_without_load_lora_weights_is_refused_in_one_line(tmp_path, family, request):
    """PixArt and DiT pipelines have no load_lora_weights; nor has diffusers' UNet2DModel a LoRA loader, yet a
    pixel UNet's adapter was written in Stable Diffusion's ``unet.`` layout, which nothing could load."""
    from pgraft_cli.io.export import ExportError
    from pgraft_cli.pipelines.export import ExportOptions, export

    checkpoint, _ = _tuned_file(tmp_path, "digits" if family == "digits" else request.getfixturevalue(f"tiny_{family}_dir"), 0.0)
    with pytest.raises(ExportError, match="has no load_lora_weights") as e:
        export(str(checkpoint), tmp_path / "out", ExportOptions(format="lora"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_composed_pipeline_defaults_to_the_guidance_pgraft_samples_at(tmp_path, tiny_sd_dir):
    checkpoint, _ = _tuned_file(tmp_path, tiny_sd_dir, 0.5)
    summary = _export(checkpoint, tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "pgraft_export.json").read_text())["guidance_scale"] == 5.0
    want = _pgraft_sample(tmp_path, checkpoint, 2, 4, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    got, _ = _exported_sample(tmp_path / "pipe", 2, 4, prompt=PROMPTS)
    _assert_same(got, want)
    assert summary["pipeline"] == "PgraftPipeline"


# ----------------------------------------------------------------------------------------------
# Loading in another dtype, autocast, offloading


def _load(folder, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_gaussian_corrector_stays_exact_when_the_folder_is_loaded_or_cast_in_bf16(tmp_path):
    """``torch_dtype=torch.bfloat16`` (how Flux is loaded) and ``pipe.to(torch.bfloat16)`` cast every floating
    tensor; the Gaussian's float64 mean and factor must come through both as pgraft holds them."""
    checkpoint = _corrected_file(tmp_path, "gaussian")
    _export(checkpoint, tmp_path / "pipe")
    noise = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = load_model(str(checkpoint)).corrector(noise)
    for pipe in (_load(tmp_path / "pipe", torch_dtype=torch.bfloat16), _load(tmp_path / "pipe").to(torch.bfloat16)):
        assert pipe.unet.dtype == torch.bfloat16
        torch.testing.assert_close(pipe.corrector(noise), want, atol=0, rtol=0)


def test_a_flow_corrector_cast_to_bf16_is_one_clear_error_and_the_dtype_dict_keeps_it(tmp_path):
    """The flow corrector computes in its own dtype in pgraft; a folder loaded or cast to bf16 as a whole rounds its
    weights, so sampling names the fix; loaded with the dict it keeps float32 and samples as `pgraft sample` does in
    bf16 (model.dtype=bfloat16: the base in bf16, the corrector in its own float32)."""
    checkpoint = _corrected_file(tmp_path, "flow")
    _export(checkpoint, tmp_path / "pipe")
    noise = initial_noise(0, [0, 1], (1, 16, 16))
    fix = r'torch_dtype=\{"default": torch.bfloat16, "corrector": torch.float32\}'
    for pipe in (_load(tmp_path / "pipe", torch_dtype=torch.bfloat16), _load(tmp_path / "pipe").to(torch.bfloat16)):
        with pytest.raises(ValueError, match=fix):
            pipe(num_inference_steps=4, latents=noise, output_type="latent")
    pipe = _load(tmp_path / "pipe", torch_dtype={"default": torch.bfloat16, "corrector": torch.float32})
    assert pipe.unet.dtype == torch.bfloat16 and pipe.corrector.dtype == torch.float32
    want = load_model(str(checkpoint)).corrector.network.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.corrector.state_dict().items())
    got = pipe(num_inference_steps=4, latents=noise, output_type="latent").images
    pgraft = _pgraft_sample(tmp_path, checkpoint, 2, 4, "--set", "model.dtype=bfloat16")
    # bit-equal on this CPU (measured); elsewhere a batch-size-dependent kernel may round once differently: 1 bf16 ulp
    assert float((got.float() - pgraft).abs().max()) <= 2**-7 * float(pgraft.abs().max())


def test_the_export_records_pgraft_autocast_and_samples_under_it_as_pgraft_does(tmp_path):
    """``model.autocast``: "auto" (the default) autocasts on CUDA only, so the CPU folder runs float32 as before;
    "bf16" forces it on the CPU too, in `pgraft sample` and in the folder alike (float32 weights, x float32)."""
    checkpoint = _corrected_file(tmp_path, "gaussian")
    _export(checkpoint, tmp_path / "auto")
    assert _load(tmp_path / "auto").config.autocast == "auto"
    bf16 = ("--set", "model.autocast=bf16")
    _export(checkpoint, tmp_path / "pipe", *bf16)
    # The folder runs its UNet contiguous (it does not apply pgraft's CPU channels_last), and under bf16
    # autocast the layout moves the bf16 roundings: compare with pgraft sampling contiguous too.
    contiguous = ("--set", "sample.memory_format=contiguous")
    want = _pgraft_sample(tmp_path, checkpoint, 3, 4, *bf16, *contiguous)
    got, pipe = _exported_sample(tmp_path / "pipe", 3, 4)
    assert pipe.config.autocast == "bf16" and got.dtype == torch.float32
    # The same ops in the same order: bit-equal on an AVX512-BF16 CPU (measured 0; bf16 autocast moves x by
    # 6.8e-3 at |x| <= 1.15). On an AVX2 CPU, where oneDNN emulates bf16, one of the three images came out one
    # bf16 ulp apart (2**-7 at |x| ~ 1.15, carried into 71 % of that image; the other two bit-equal), about the
    # autocast's own largest effect there (8.7e-3), so a bound on the largest difference cannot tell the two
    # precisions apart. What does: most elements bit-equal (measured 100 % and 76 %; 0 % with the folder's
    # autocast off, or off at its first step only), and the folder's samples closer to pgraft's bf16 ones than
    # to its float32 ones over all elements (a folder without autocast is equal to the float32 ones).
    f32 = _pgraft_sample(tmp_path, checkpoint, 3, 4, *contiguous)
    assert float((f32 - want).abs().max()) > 1e-3
    assert float((got - want).abs().max()) <= 2**-7 * float(want.abs().max())
    assert float((got == want).float().mean()) > 0.5
    assert float((got - want).abs().mean()) < float((got - f32).abs().mean())


def test_the_composed_pipeline_puts_its_inputs_on_the_execution_device(tmp_path, monkeypatch):
    """Under enable_model_cpu_offload() the networks sit on the CPU while they run on the GPU: the pipeline must
    place its noise and inputs on ``_execution_device`` (as diffusers' pipelines do), not on ``unet.device``."""
    _export(_corrected_file(tmp_path, "gaussian"), tmp_path / "pipe")
    pipe = _load(tmp_path / "pipe")
    asked = []

    def execution_device(self):
        asked.append(True)
        return torch.device("cpu")

    monkeypatch.setattr(type(pipe), "_execution_device", property(execution_device))
    pipe(num_inference_steps=4, latents=initial_noise(0, [0], (1, 16, 16)), output_type="latent")
    assert asked


def test_the_composed_pipeline_decodes_a_force_upcast_float16_vae_in_float32(tiny_sdxl_dir):
    """pgraft sample decodes a float16 VAE whose config sets force_upcast (SDXL's, which overflows: NaN
    images) in float32; the exported pipeline decoded it in float16."""
    from pgraft_cli.io.export import _scheduler
    from pgraft_cli.io.export_pipeline import PgraftPipeline

    model = load_model(str(tiny_sdxl_dir))
    vae = model.vae
    assert vae.config.force_upcast
    model.to("cpu", torch.float16)
    p = model.pipeline
    pipe = PgraftPipeline(unet=model.network, scheduler=_scheduler(model), vae=vae, text_encoder=p.text_encoder,
                          tokenizer=p.tokenizer, text_encoder_2=p.text_encoder_2, tokenizer_2=p.tokenizer_2,
                          family="sdxl", text_pipeline="StableDiffusionXLPipeline")
    pipe.set_progress_bar_config(disable=True)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: (seen.append((z.dtype, vae.dtype)), decode(z, *a, **k))[1]
    x = torch.randn((1, *model.sample_shape), generator=torch.Generator().manual_seed(0)).half()
    images = pipe(prompt=["a red square"], num_inference_steps=1, guidance_scale=1.0, latents=x, output_type="pt").images
    assert seen == [(torch.float32, torch.float32)] and vae.dtype == torch.float16 and bool(torch.isfinite(images).all())


def test_a_kind_override_exports_the_sampler_pgraft_runs(tmp_path, tiny_sd_dir):
    """An SD model loaded with --kind flow was exported as a stock StableDiffusionPipeline driving the config's
    DDIM scheduler: other images than pgraft's. It goes through the composed pipeline, on pgraft's flow grid."""
    written = _export(tiny_sd_dir, tmp_path / "exp", "--kind", "flow")
    assert written["pipeline"] == "PgraftPipeline"
    scheduler = json.loads((tmp_path / "exp" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    want = _pgraft_sample(tmp_path, tiny_sd_dir, 2, 4, "--kind", "flow", "--prompt", "a red square", "--guidance-scale", "1")
    got, _ = _exported_sample(tmp_path / "exp", 2, 4, prompt=["a red square"] * 2, guidance_scale=1.0)
    _assert_same(got, want)


def test_export_refuses_to_replace_the_folder_holding_a_composed_files_base(tmp_path):
    """`export corrected.safetensors --out BASE_FOLDER --force` deleted the base the file records (loaded, not named)."""
    from pgraft_cli.io.checkpoints import save_pgraft_safetensors

    digits = load_model("digits")
    folder = tmp_path / "bases"
    folder.mkdir()
    base = save_pgraft_safetensors(folder / "m.safetensors", digits.network, digits.model_class, digits.model_config,
                                   digits.scheduler_config, {})
    corrector = NoiseCorrector("gaussian-diag", 4, 0, mean=torch.zeros(256), std=torch.ones(256))
    path = save_corrected(tmp_path / "c.safetensors", corrector, load_model(str(base)), {}, {})
    before = base.read_bytes()
    result = runner.invoke(app, ["export", str(path), "--out", str(folder), "--force"])
    assert isinstance(result.exception, PgraftError) and "would overwrite the base of CHECKPOINT" in str(result.exception)
    assert base.read_bytes() == before and load_model(str(path)).corrector is not None

    # down the chain: a corrector of a fine-tune rests on the fine-tune's base too, for export and for correct
    from pgraft_cli.models.lora import add_lora

    model = load_model(str(base))
    info = base_info_of(model)
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    tuned = save_finetuned(tmp_path / "t.safetensors", model, info, FinetuneConfig(cutoff=0.5, lora_rank=2, lora_alpha=2),
                           {}, {})
    chained = save_corrected(tmp_path / "ct.safetensors", corrector, load_model(str(tuned)), {}, {})
    result = runner.invoke(app, ["export", str(chained), "--out", str(folder), "--force"])
    assert isinstance(result.exception, PgraftError)
    assert "would overwrite the base of the base of CHECKPOINT" in str(result.exception)
    result = runner.invoke(app, ["correct", str(tuned), "--out", str(base)])
    assert isinstance(result.exception, PgraftError) and "would overwrite the base of MODEL" in str(result.exception)
    assert base.read_bytes() == before and load_model(str(chained)).corrector is not None


def test_exported_files_get_the_usual_permissions(tmp_path):
    """diffusers' save_pretrained writes its weights with safetensors' save_file, which makes them 0600: an export
    meant to be shared was unreadable to the user's group whatever the umask. Every file gets the usual mode."""
    out = tmp_path / "pipe"
    _export("digits", out)
    (tmp_path / "plain").write_text("x")
    usual = (tmp_path / "plain").stat().st_mode & 0o777
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.relative_to(out).as_posix(): f.stat().st_mode & 0o777 for f in files} == {
        f.relative_to(out).as_posix(): usual for f in files}


def test_pgraft_names_its_own_composed_export_as_such(tmp_path):
    """`pgraft inspect` of a composed export (pipeline.py) said "...contains custom code in pipeline.py ... You can
    inspect the file co); check the folder is complete": cut mid-word, and the fix wrong."""
    from conftest import cli_run

    _export("digits", tmp_path / "pipe")
    proc = cli_run("inspect", tmp_path / "pipe")
    assert proc.returncode == 2 and "is a pgraft export" in proc.stderr and "exported from" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_corrected_fine_tune_is_evaluated_at_its_correctors_steps_without_the_tuned_steps_note(tmp_path):
    """A fine-tuned file is evaluated at the steps of its own evaluation, with a note; a corrector fitted over such a
    file (whose recipe it keeps) runs at the corrector's steps, and the note named the fine-tune's count instead."""
    from pgraft_cli.models.lora import add_lora

    model = load_model("digits")
    info = base_info_of(model)
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    recipe = {"sample": {"steps": 16}, "evaluate": {"steps": None}}
    tuned = save_finetuned(tmp_path / "t.safetensors", model, info, FinetuneConfig(cutoff=0.5, lora_rank=2, lora_alpha=2),
                           {}, recipe)
    corrector = NoiseCorrector("gaussian-diag", 4, 0, mean=torch.zeros(256, dtype=torch.float64),
                               std=torch.ones(256, dtype=torch.float64))
    corrected = save_corrected(tmp_path / "ct.safetensors", corrector, load_model(str(tuned)), {}, recipe)
    for path, steps in ((tuned, 16), (corrected, 4)):
        proc = cli_run("evaluate", path, "--num", "4", "--features", "none", "--json", "--run-dir", tmp_path / path.stem)
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout.strip().splitlines()[-1])
        said = [n for n in shown["notes"] if "tuned and evaluated at" in n]
        assert (shown["steps"], bool(said)) == (steps, steps == 16)
