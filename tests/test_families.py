"""Parity of every model family with its own diffusers pipeline, and the family registry.

Each family's tiny random-weight pipeline (conftest.py) runs twice from the same initial noise on
the pipeline's own timestep/sigma grid: once through diffusers' pipeline, once through pgraft's
adapter, guidance and sampler. The final latents and the decoded images must agree to 1e-4, which
pins latent packing, VAE scaling and shift, guidance and the prediction conversions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pgraft_cli.core.samplers import sample
from pgraft_cli.errors import ModelLoadError
from pgraft_cli.io.checkpoints import describe, load_model
from pgraft_cli.models.families import SUPPORTED_CLASSES, family_for

ATOL = 1e-4
STEPS = 4


def diffusers_grid(model) -> torch.Tensor:
    """The pipeline scheduler's own grid in pgraft's time: sigmas for flows, timesteps / T then 0 for diffusion."""
    scheduler = model.pipeline.scheduler
    if model.family == "flow":
        return scheduler.sigmas.double()
    return torch.cat([scheduler.timesteps.double() / model.schedule.num_train_timesteps, torch.zeros(1, dtype=torch.float64)])


def pgraft_sample(model, noise, prompts=None, classes=None, guidance=1.0, **encode):
    """pgraft's sampler on the diffusers grid (the pipeline has just set its scheduler's timesteps)."""
    cond = model.encode(prompts, classes, guidance, **encode)
    with torch.inference_mode():
        x, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, diffusers_grid(model))
        return x, model.decode(x)


def assert_parity(ours, theirs):
    """Equal to 1e-4 of the output's scale: images in [0, 1]; random-weight latents reach |x| ~ 300
    (x0 = (x - s e) / a with a ~ 0.006 at t ~ 1), where float32 rounding alone is ~1e-5 per operation."""
    assert ours.shape == theirs.shape
    assert torch.isfinite(ours).all() and ours.abs().max() > 1e-3  # a real output, not zeros
    scale = max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL * scale)


def noise_for(model, n, seed=0):
    return torch.randn((n, *model.sample_shape), generator=torch.Generator().manual_seed(seed))


def text_parity(model, guidance, pipe_kwargs=None, pack=lambda x: x, **encode):
    pipe, prompts = model.pipeline, ["a red square", "two blue circles"]
    noise = noise_for(model, len(prompts))
    kwargs = dict(prompt=prompts, num_inference_steps=STEPS, guidance_scale=guidance, **(pipe_kwargs or {}))
    with torch.inference_mode():
        latents = pipe(latents=pack(noise.clone()), output_type="latent", **kwargs).images
        images = pipe(latents=pack(noise.clone()), output_type="pt", **kwargs).images
    ours, decoded = pgraft_sample(model, noise, prompts=prompts, guidance=guidance, **encode)
    return pack(ours), latents, decoded, images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sd_matches_stable_diffusion_pipeline(tiny_sd_dir, guidance):
    from diffusers import DDIMScheduler

    model = load_model(str(tiny_sd_dir))
    # the folder's DDIM ends on alphas_cumprod[0]; pgraft's sampler ends on clean data (alpha = 1)
    model.pipeline.scheduler = DDIMScheduler.from_config(model.pipeline.scheduler.config, set_alpha_to_one=True)
    ours, latents, decoded, images = text_parity(model, guidance)
    assert_parity(ours, latents)
    assert_parity(decoded, images)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sdxl_matches_stable_diffusion_xl_pipeline(tiny_sdxl_dir, guidance):
    model = load_model(str(tiny_sdxl_dir))
    assert describe(model)["architecture"] == "sdxl" and model.conditioning == "text"
    # diffusers' Euler (epsilon, sigma space) is pgraft's DDIM step on its own grid
    ours, latents, decoded, images = text_parity(model, guidance)
    assert_parity(ours, latents)
    assert_parity(decoded, images)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sd3_matches_stable_diffusion_3_pipeline(tiny_sd3_dir, guidance):
    model = load_model(str(tiny_sd3_dir))
    ours, latents, decoded, images = text_parity(model, guidance)
    assert_parity(ours, latents)
    assert_parity(decoded, images)


def test_sd3_with_its_t5_encoder_matches_stable_diffusion_3_pipeline(tmp_path):
    from conftest import build_tiny_sd3_pipeline

    model = load_model(str(build_tiny_sd3_pipeline(tmp_path / "sd3-t5", t5=True)))
    assert model.pipeline.text_encoder_3 is not None
    ours, latents, decoded, images = text_parity(model, 3.0)
    assert_parity(ours, latents)
    assert_parity(decoded, images)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_pixart_matches_pixart_alpha_pipeline(tiny_pixart_dir, guidance):
    model = load_model(str(tiny_pixart_dir))
    assert describe(model)["architecture"] == "pixart" and model.network.config.out_channels == 8  # learned sigma
    ours, latents, decoded, images = text_parity(
        model, guidance, pipe_kwargs=dict(use_resolution_binning=False, clean_caption=False))
    assert_parity(ours, latents)
    assert_parity(decoded, images)


@pytest.mark.parametrize("distilled", [3.5, 7.0])
def test_flux_matches_flux_pipeline(tiny_flux_dir, distilled):
    from pgraft_cli.models.families.flux import pack

    model = load_model(str(tiny_flux_dir))
    assert describe(model)["architecture"] == "flux" and not model.guided  # guidance is an input, not two calls
    size = dict(zip(("height", "width"), model.image_shape[1:]))  # FluxPipeline defaults to 128 latent pixels
    ours, latents, decoded, images = text_parity(model, distilled, pipe_kwargs=size, pack=pack,
                                                 distilled_guidance=distilled)
    assert_parity(ours, latents)
    assert_parity(decoded, images)
    # the dynamic shift at 16 tokens: pgraft's own grid is the pipeline's
    torch.testing.assert_close(model.schedule.grid(STEPS), diffusers_grid(model), rtol=0, atol=1e-6)


def test_pixart_sigma_matches_pixart_sigma_pipeline(tmp_path):
    from conftest import build_tiny_pixart_pipeline

    model = load_model(str(build_tiny_pixart_pipeline(tmp_path / "sigma", sigma=True)))
    assert type(model.pipeline).__name__ == "PixArtSigmaPipeline"
    ours, latents, decoded, images = text_parity(model, 4.5, pipe_kwargs=dict(use_resolution_binning=False))
    assert_parity(ours, latents)
    assert_parity(decoded, images)


def test_flux_schnell_matches_flux_pipeline_with_no_guidance_input(tmp_path):
    from conftest import build_tiny_flux_pipeline
    from pgraft_cli.models.families.flux import pack

    model = load_model(str(build_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)))
    assert not model.network.config.guidance_embeds and not model.guided
    size = dict(zip(("height", "width"), model.image_shape[1:]))
    # the pipeline ignores its guidance_scale for schnell; pgraft ignores the distilled guidance
    ours, latents, decoded, images = text_parity(model, 3.5, pipe_kwargs=size, pack=pack, distilled_guidance=7.0)
    assert_parity(ours, latents)
    assert_parity(decoded, images)


def test_flux_guidance_is_the_distilled_input_and_moves_the_sample(tiny_flux_dir):
    model = load_model(str(tiny_flux_dir))
    noise = noise_for(model, 1)
    model.pipeline.scheduler.set_timesteps(sigmas=None, num_inference_steps=STEPS, mu=math.log(model.schedule.shift))
    low, high = (pgraft_sample(model, noise, prompts=["a cat"], distilled_guidance=g)[0] for g in (1.0, 6.0))
    assert (low - high).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_matches_dit_pipeline(tiny_dit_dir, guidance):
    model = load_model(str(tiny_dit_dir))
    info = describe(model)
    assert (info["architecture"], model.conditioning, model.num_classes, model.null_class) == ("dit", "class", 1000, 1000)
    assert model.guided
    classes, seed = [3, 999], 7
    # DiTPipeline draws its own noise: the same generator gives pgraft the same draw
    noise = torch.randn((len(classes), *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        images = model.pipeline(class_labels=classes, guidance_scale=guidance, num_inference_steps=STEPS,
                                generator=torch.Generator().manual_seed(seed), output_type="np").images
    _, decoded = pgraft_sample(model, noise, classes=classes, guidance=guidance)
    assert_parity(decoded, torch.from_numpy(images).permute(0, 3, 1, 2))  # ("pt": numpy anyway in diffusers 0.35)


def test_pixel_unet_matches_ddim_pipeline(unet_pipeline_dir):
    from diffusers import DDIMPipeline, DDIMScheduler

    model = load_model(str(unet_pipeline_dir("ddim", channels=3)))
    # pgraft's sampler neither clips x0 nor evaluates at t = 0 (leading spacing's last timestep)
    scheduler = DDIMScheduler.from_config(model.scheduler_config, clip_sample=False, timestep_spacing="trailing")
    pipe, seed = DDIMPipeline(unet=model.network, scheduler=scheduler), 5
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, eta=0.0,
                      output_type="np").images
    grid = torch.cat([pipe.scheduler.timesteps.double() / 1000, torch.zeros(1, dtype=torch.float64)])
    with torch.inference_mode():
        x, _ = sample(lambda x, t: model.predict(x, t, model.encode(None, None, 1.0)), model.schedule, noise, grid)
    assert_parity(model.decode(x).permute(0, 2, 3, 1), torch.from_numpy(theirs))  # DDIMPipeline: channels last


# ----------------------------------------------------------------------------------------------
# The registry


def test_registry_names_every_family_and_refuses_the_rest(tiny_sdxl_dir):
    assert {"UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "DiTTransformer2DModel"} <= set(SUPPORTED_CLASSES)
    unet_config = json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())
    assert family_for("UNet2DConditionModel", unet_config).name == "sdxl"
    assert family_for("UNet2DConditionModel", {**unet_config, "addition_embed_type": None}).name == "sd"
    with pytest.raises(ModelLoadError, match="extra conditioning") as exc:
        family_for("UNet2DConditionModel", {**unet_config, "addition_embed_type": "image"})
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelLoadError, match="not supported; pgraft loads UNet2DModel, ") as exc:
        family_for("AutoencoderKL", {})
    assert all(name in str(exc.value) for name in SUPPORTED_CLASSES)


# ----------------------------------------------------------------------------------------------
# Each family through the CLI: inspect, guided sample, reward-only evaluate, LoRA and full finetune with a
# reward, each sampled back

TWO_PROMPTS = ["--prompt", "a red cube", "--prompt", "a blue ball"]
GUIDED = ["--guidance-scale", "3.0"]
FAMILY_RUNS = {  # fixture: (architecture, conditioning options, sample's guidance options, image shape)
    "tiny_sd_dir": ("sd", TWO_PROMPTS, GUIDED, [3, 16, 16]),
    "tiny_sdxl_dir": ("sdxl", TWO_PROMPTS, GUIDED, [3, 16, 16]),
    "tiny_sd3_dir": ("sd3", TWO_PROMPTS, GUIDED, [3, 16, 16]),
    "tiny_dit_dir": ("dit", ["--class", "3"], GUIDED, [3, 16, 16]),
    "tiny_pixart_dir": ("pixart", TWO_PROMPTS, GUIDED, [3, 16, 16]),
    "tiny_flux_dir": ("flux", [*TWO_PROMPTS, "--set", "sample.distilled_guidance=4.0"], [], [3, 16, 16]),
    "pixel_class_unet": ("unet2d", ["--class", "3"], [], [3, 8, 8]),  # no null class: unguided
}
TINY = ["--set", "sample.lane=2", "--set", "sample.batch_size=4", "--set", "sample.steps=2"]


def _cli(*args):
    from typer.testing import CliRunner

    from pgraft_cli.cli import app

    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    text = result.stdout.strip()
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])  # inspect prints it indented


def _pngs(folder):
    from PIL import Image

    images = sorted(folder.glob("*.png"))
    return [Image.open(p) for p in images]


def _finetune_and_sample_back(folder, tmp_path, name, lora_rank, conditioning, guided):
    """``pgraft finetune`` with a reward at ``lora_rank`` (0: full), then the tuned file sampled back;
    returns the loaded tuned model and the file's keys."""
    from safetensors import safe_open

    out = tmp_path / f"{name}.safetensors"
    _cli("finetune", folder, "--reward", "jpeg-compressibility", "--cutoff", "0.5", "--lora-rank", lora_rank,
         "--run-dir", tmp_path / f"f-{name}", "--out", out, *conditioning, "--set", "sample.num=8",
         "--set", "sample.steps=2", "--set", "sample.lane=4", "--set", "sample.batch_size=8",
         "--set", "finetune.steps=2", "--set", "finetune.batch_size=2", "--set", "finetune.rounds=1",
         "--set", "finetune.learning_rate=1e-2", "--set", "evaluate.num=4", "--set", "filter.m=4")
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    _cli("sample", out, "--num", "4", "--run-dir", tmp_path / f"t-{name}",
         "--out", tmp_path / f"images-{name}", *conditioning, *guided, *TINY)
    assert len(_pngs(tmp_path / f"images-{name}")) == 4
    return load_model(str(out)), keys


@pytest.mark.slow
@pytest.mark.parametrize("fixture", sorted(FAMILY_RUNS))
def test_family_inspect_sample_evaluate_finetune_and_sample_back(fixture, request, tmp_path):
    architecture, conditioning, guided, shape = FAMILY_RUNS[fixture]
    if fixture == "pixel_class_unet":
        folder = request.getfixturevalue("unet_pipeline_dir")("ddim", channels=3, num_class_embeds=10)
    else:
        folder = request.getfixturevalue(fixture)
    info = _cli("inspect", folder)
    assert info["architecture"] == architecture and info["latent"] == (architecture != "unet2d")
    assert info["image_shape"] == shape
    _cli("sample", folder, "--num", "4", "--run-dir", tmp_path / "s", "--out", tmp_path / "base", *conditioning, *guided,
         *TINY)
    base = _pngs(tmp_path / "base")
    assert len(base) == 4 and all(im.size == tuple(shape[1:]) and im.mode == "RGB" for im in base)
    # evaluate takes no --class: it samples every class
    prompts = [] if conditioning[0] == "--class" else conditioning
    scores = _cli("evaluate", folder, "--reward", "jpeg-compressibility", "--features", "none", "--num", "4",
                  "--run-dir", tmp_path / "e", *prompts, *TINY)
    assert (scores["reward"], scores["num"], scores["nfe"]) == ("jpeg-compressibility", 4, 2), scores
    assert math.isfinite(scores["reward_mean"]) and scores["reward_mean"] < 0  # minus the JPEG size in kB

    tuned, keys = _finetune_and_sample_back(folder, tmp_path, "lora", 2, conditioning, guided)
    assert keys and all("lora_" in k for k in keys)
    assert tuned.lora and tuned.adapter.name == architecture
    assert any(float(v.abs().max()) > 0 for k, v in tuned.network.state_dict().items() if "lora_B" in k)

    full, keys = _finetune_and_sample_back(folder, tmp_path, "full", 0, conditioning, guided)
    assert keys and not any("lora_" in k for k in keys)
    assert not full.lora and full.tuned is not None and full.adapter.name == architecture
    reference, tuned_state = full.network.state_dict(), full.tuned.state_dict()  # base below the cutoff, tuned above
    assert set(tuned_state) == set(reference) and len(keys) == len(reference)
    assert any(not torch.equal(tuned_state[k], reference[k]) for k in reference)  # the full weights moved


def test_sigma_preconditioned_schedulers_and_per_channel_latent_vaes_are_refused(tmp_path, tiny_sdxl_dir):
    """An EDM scheduler (Playground v2.5) was read as DDPM's default linear betas and a VAE's latents_mean /
    latents_std were never applied: wrong images without a word. Both are one load error now."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from pgraft_cli.io.checkpoints import schedule_from_config

    for config in ({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5},
                   {"_class_name": "EDMEulerScheduler"}, {"_class_name": "ScoreSdeVeScheduler"},
                   {"_class_name": "CMStochasticIterativeScheduler"},
                   {"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}):
        with pytest.raises(ModelLoadError, match="preconditions its network by sigma"):
            schedule_from_config(config)
    assert schedule_from_config({"_class_name": "EulerDiscreteScheduler", "timestep_type": "discrete"}).family == "diffusion"
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.vae.register_to_config(latents_mean=[-1.6, 1.9, -1.4, 2.5], latents_std=[8.5, 5.9, 6.5, 5.2])
    pipe.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="latents_mean / latents_std") as err:
        load_model(str(folder))
    assert "\n" not in str(err.value)


def test_lcm_distilled_unets_and_consistency_schedulers_are_refused(tmp_path):
    """An LCM-distilled UNet (``time_cond_proj_dim``: LCM_Dreamshaper_v7, lcm-sdxl) takes the guidance scale as an
    input embedding and no classifier-free guidance; pgraft ran its two-call guidance without the embedding and
    sampled other images than StableDiffusionPipeline without a word (max difference 8.8 on a tiny one). LCM's
    and TCD's schedulers sample by a consistency model's own multistep rule. Both are one load error now."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from conftest import build_tiny_sd_pipeline
    from pgraft_cli.io.checkpoints import schedule_from_config

    folder = build_tiny_sd_pipeline(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 16})
    pipe.save_pretrained(tmp_path / "lcm")
    with pytest.raises(ModelLoadError, match="guidance scale as an input") as err:
        load_model(str(tmp_path / "lcm"))
    assert "\n" not in str(err.value)
    for name in ("LCMScheduler", "TCDScheduler"):
        with pytest.raises(ModelLoadError, match="consistency-distilled"):
            schedule_from_config({"_class_name": name, "num_train_timesteps": 1000})


def test_transformer2dmodel_folders_load_as_diffusers_remaps_them(tmp_path, tiny_dit_dir, tiny_pixart_dir):
    """The hub's DiT and PixArt-alpha transformer folders name their class ``Transformer2DModel``, which diffusers
    remaps by ``norm_type``: as pipeline folders they loaded, as a model folder (DiT) or as the --config of
    bare weights (PixArt, whose text encoders the pipeline folder holds) they were refused as unsupported."""
    import shutil

    from pgraft_cli.io.checkpoints import network_class_name

    def legacy(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))

    dit = tmp_path / "dit"
    shutil.copytree(tiny_dit_dir / "transformer", dit)
    shutil.copy(tiny_dit_dir / "scheduler" / "scheduler_config.json", dit / "scheduler_config.json")
    legacy(dit)
    pixart = tmp_path / "pixart"
    shutil.copytree(tiny_pixart_dir, pixart)
    legacy(pixart / "transformer")
    weights = next((pixart / "transformer").glob("*.safetensors"))
    for model, source, remapped in ((load_model(str(dit)), tiny_dit_dir, "DiTTransformer2DModel"),
                                    (load_model(str(weights), config=str(pixart)), tiny_pixart_dir,
                                     "PixArtTransformer2DModel")):
        assert model.model_class == remapped
        reference = load_model(str(source)).network.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in model.network.state_dict().items())
    assert network_class_name({"_class_name": "Transformer2DModel", "norm_type": "layer_norm"}) == "Transformer2DModel"


def test_a_scheduler_that_clips_its_clean_estimate_is_named_at_load(unet_pipeline_dir):
    """``clip_sample`` / ``thresholding`` (google/ddpm-* ship ``clip_sample: true``) clip the predicted clean sample
    at every step of diffusers' pipeline; pgraft's sampler does not (it must stay invertible), so its images
    differ from the shipped pipeline's: said in one note at load, not left silent."""
    from conftest import cli_run
    from pgraft_cli.pipelines.skeleton import clipping_note

    assert clipping_note({"_class_name": "DDPMScheduler", "clip_sample": True}) is not None
    assert "thresholding" in clipping_note({"_class_name": "DDIMScheduler", "clip_sample": False, "thresholding": True})
    assert clipping_note({"_class_name": "DDIMScheduler", "clip_sample": False}) is None
    assert clipping_note({"_class_name": "PNDMScheduler"}) is None  # it has no such option
    assert "clip_sample" in clipping_note({"_class_name": "DDPMScheduler"})  # no key: DDPMScheduler's default, True
    clipped, plain = unet_pipeline_dir("ddpm"), unet_pipeline_dir("ddim")
    config = json.loads((plain / "scheduler" / "scheduler_config.json").read_text())
    (plain / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "clip_sample": False}))
    for folder, said in ((clipped, True), (plain, False)):
        proc = cli_run("sample", folder, "--num", "2", "--steps", "2", "--run-dir", folder.parent / f"run-{folder.name}")
        assert proc.returncode == 0, proc.stderr
        assert ("clip_sample" in proc.stdout + proc.stderr) == said


def test_a_kind_that_contradicts_the_scheduler_is_named(tmp_path):
    """`pgraft sample digits --kind diffusion` (a flow read as DDPM) exited 0 with noise-like images (81 % of pixels
    black) without a word; a note now names the scheduler and what --kind did."""
    from conftest import cli_run

    proc = cli_run("sample", "digits", "--num", "2", "--steps", "2", "--kind", "diffusion", "--run-dir", tmp_path / "r")
    assert proc.returncode == 0 and "FlowMatchEulerDiscreteScheduler (a flow model), read as diffusion" in proc.stderr
    plain = cli_run("sample", "digits", "--num", "2", "--steps", "2", "--kind", "flow", "--run-dir", tmp_path / "p")
    assert plain.returncode == 0 and "read as" not in plain.stderr
