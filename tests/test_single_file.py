"""Released single-file checkpoints: detected from their keys, loaded through diffusers' from_single_file with a
local --config folder, keyed by the file and the folder, and found again as the base of files made from them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import build_tiny_sd_pipeline
from pgraft_cli.cli import app
from pgraft_cli.errors import ModelLoadError
from pgraft_cli.io.checkpoints import base_info_of, identity_of, load_model, save_corrected, save_finetuned
from pgraft_cli.io.recipes import FinetuneConfig
from pgraft_cli.io.runstore import sha256_file
from pgraft_cli.io.single_file import (FLUX_DEV, FLUX_SCHNELL, SD1, SD2, SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, SDXL,
                                       detect_layout, flux_to_single_file, mmdit_to_single_file, sd3_to_single_file,
                                       to_single_file)
from pgraft_cli.models.corrector import NoiseCorrector
from pgraft_cli.stages.finetune import prepare_tuning
from test_export import PROMPTS, _pgraft_sample

runner = CliRunner()


def _single_file(folder, out):
    """The folder's UNet, VAE and text encoder in the original layout, as a released file has them."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    open_clip = pipe.unet.config.use_linear_projection  # the tiny SD 2 pipeline's marker
    state = to_single_file(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(),
                           pipe.unet.config.layers_per_block, open_clip)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


@pytest.fixture(params=[False, True], ids=["sd1", "sd2"])
def sd(request, tmp_path, tiny_sd_dir):
    """(pipeline folder, its single file, layout) for SD 1.x and SD 2.x (OpenCLIP keys, v-prediction)."""
    folder = build_tiny_sd_pipeline(tmp_path / "sd2", sd2=True) if request.param else tiny_sd_dir
    return folder, _single_file(folder, tmp_path / "model.safetensors"), SD2 if request.param else SD1


def _fail(*args):
    result = runner.invoke(app, [*map(str, args)])
    assert result.exit_code != 0 and isinstance(result.exception, ModelLoadError), result.output
    assert "\n" not in str(result.exception)
    return str(result.exception)


def test_single_file_samples_the_images_of_its_folder_and_inspect_names_the_layout(tmp_path, sd):
    folder, file, layout = sd
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    got = _pgraft_sample(tmp_path, file, 2, 3, "--config", folder, *prompts)
    want = _pgraft_sample(tmp_path, folder, 2, 3, *prompts)
    assert torch.equal(got, want)
    result = runner.invoke(app, ["inspect", str(file), "--config", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["source_kind"] == f"single-file {layout.name}" and info["model_class"] == "UNet2DConditionModel"
    assert info["prediction_type"] == ("v_prediction" if layout is SD2 else "epsilon")
    assert info["identity"] == f"{sha256_file(file)}+{identity_of(folder.absolute())}"


def test_identity_changes_with_the_config_folder(tmp_path, tiny_sd_dir):
    import shutil

    file = _single_file(tiny_sd_dir, tmp_path / "model.safetensors")
    other = shutil.copytree(tiny_sd_dir, tmp_path / "other")
    sched = other / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"beta_end": 0.02}))
    a, b = load_model(str(file), config=str(tiny_sd_dir)), load_model(str(file), config=str(other))
    assert a.identity.split("+")[0] == b.identity.split("+")[0] and a.identity != b.identity
    assert a.schedule.alphas_cumprod[-1] != b.schedule.alphas_cumprod[-1]
    from safetensors.torch import load_file

    # copies: diffusers 0.35 leaves a single file's tensors mapped from it, and the file is rewritten below
    bias = a.network.conv_out.bias.detach().clone()
    state = {k: v.clone() for k, v in load_file(str(file)).items()}
    state["model.diffusion_model.out.2.bias"] += 1.0  # the weights come from the file, not from the folder
    save_file(state, str(file))
    c = load_model(str(file), config=str(tiny_sd_dir))
    assert torch.equal(c.network.conv_out.bias, bias + 1.0) and c.identity != a.identity


def test_without_config_one_line_names_the_layout_and_the_folder_and_writes_nothing(tmp_path, sd):
    folder, file, layout = sd
    run = tmp_path / "run"
    message = _fail("sample", file, "--num", "2", "--run-dir", run)
    assert f"is a {layout.name} single-file checkpoint" in message and layout.config_repo in message
    assert "--config" in message and not run.exists()
    assert "needs --config" in _fail("inspect", file, "--config", folder / "unet")  # a folder, but not a pipeline's


@pytest.mark.parametrize("keys, layout", [
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "conditioner.embedders.1.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"], SDXL),
    (["model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight"], SDXL),
    (["double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight", "img_in.weight"], FLUX_DEV),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.img_in.weight"],
     FLUX_SCHNELL),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.decoder.conv_in.weight"],
     SD3_MEDIUM),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.joint_blocks.0.x_block."
      "attn.ln_q.weight", "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"], SD35_MEDIUM),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.joint_blocks.0.x_block."
      "attn.ln_q.weight", "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"], SD35_LARGE),
])
def test_sdxl_flux_and_sd3_are_detected_and_ask_for_their_config_folder(tmp_path, keys, layout):
    file = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2) for k in keys}, str(file))
    assert detect_layout(keys) is layout
    message = _fail("inspect", file)
    assert f"is a {layout.name} single-file checkpoint" in message and f"laid out as {layout.config_repo}" in message


def test_unknown_keys_are_one_line_listing_the_supported_layouts(tmp_path, tiny_sd_dir):
    for i, keys in enumerate([["encoder.weight"], ["model.diffusion_model.something.weight"]]):
        file = tmp_path / f"m{i}.safetensors"
        save_file({k: torch.zeros(2) for k in keys}, str(file))
        message = _fail("inspect", file, *(["--config", tiny_sd_dir] if i else []))
        assert "neither a pgraft file nor a single-file checkpoint" in message
        assert all(name in message for name in ("SD 1.x", "SD 2.x", "SDXL", "Flux.1-dev"))


def test_files_made_from_a_single_file_find_it_again(tmp_path, tiny_sd_dir):
    """A full fine-tune of the single file samples as the same fine-tune of the folder, with no --config; a
    corrector file records the base's config folder and hash too."""
    file = _single_file(tiny_sd_dir, tmp_path / "model.safetensors")
    tuned = {}
    for name, source, config in (("file", file, str(tiny_sd_dir)), ("folder", tiny_sd_dir, None)):
        model = load_model(str(source), config=config)
        cfg = FinetuneConfig(cutoff=0.5, lora_rank=0)
        with torch.no_grad():
            for p in prepare_tuning(model, cfg).parameters():
                p.mul_(0.8)
        tuned[name] = save_finetuned(tmp_path / f"tuned-{name}.safetensors", model, base_info_of(model), cfg, {}, {})
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert torch.equal(_pgraft_sample(tmp_path, tuned["file"], 2, 3, *prompts),
                       _pgraft_sample(tmp_path, tuned["folder"], 2, 3, *prompts))
    loaded = load_model(str(tuned["file"]))
    base = load_model(str(file), config=str(tiny_sd_dir))
    assert loaded.base_identity == base.identity and loaded.source_kind == "pgraft-finetune"
    corrector = NoiseCorrector("gaussian-diag", 3, 0, mean=torch.zeros(256, dtype=torch.float64),
                               std=torch.ones(256, dtype=torch.float64))
    corrected = load_model(str(save_corrected(tmp_path / "corrected.safetensors", corrector, base, {}, {})))
    assert corrected.base_identity == base.identity and corrected.config_dir == str(tiny_sd_dir.absolute())


def _tiny_sdxl(folder, out):
    """A tiny SDXL pipeline folder shaped as the release and its file in the original layout:
    ``conditioner.embedders.0`` OpenAI CLIP, ``.1`` OpenCLIP with ``text_projection`` as (in, out)."""
    from diffusers import StableDiffusionXLPipeline

    from conftest import build_tiny_sdxl_pipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(build_tiny_sdxl_pipeline(folder, released=True)))
    state = to_single_file(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), 1, False,
                           pipe.text_encoder_2.state_dict())
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return pipe


def test_sdxl_file_samples_the_images_of_its_folder_with_every_weight_of_it(tmp_path):
    want = _tiny_sdxl(tmp_path / "sdxl", tmp_path / "sdxl.safetensors")
    file, folder = tmp_path / "sdxl.safetensors", tmp_path / "sdxl"
    loaded = load_model(str(file), config=str(folder))
    assert type(loaded.pipeline).__name__ == "StableDiffusionXLPipeline" and loaded.adapter.name == "sdxl"
    assert loaded.source_kind == "single-file SDXL"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, ref = getattr(loaded.pipeline, part).state_dict(), getattr(want, part).state_dict()
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), part
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    got = _pgraft_sample(tmp_path, file, 2, 3, "--config", folder, *prompts)
    assert torch.equal(got, _pgraft_sample(tmp_path, folder, 2, 3, *prompts))


def _flux_converter_at_the_file_width():
    """diffusers' own Flux converter, reading the transformer's width from the file (img_in's rows) where
    0.42 fixes Flux.1's 3072, so that a tiny file converts; unchanged where diffusers already reads it."""
    import inspect

    from diffusers.loaders import single_file_utils as utils

    source = inspect.getsource(utils.convert_flux_transformer_checkpoint_to_diffusers)
    fixed = "    inner_dim = 3072\n"
    if fixed not in source:
        return utils.convert_flux_transformer_checkpoint_to_diffusers
    namespace = dict(vars(utils))
    exec(source.replace(fixed, '    inner_dim = checkpoint["img_in.weight"].shape[0]\n'), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "schnell"])
def test_flux_file_samples_the_images_of_its_folder(tmp_path, monkeypatch, dev):
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from conftest import build_tiny_flux_pipeline

    monkeypatch.setitem(SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], "checkpoint_mapping_fn",
                        _flux_converter_at_the_file_width())
    folder = build_tiny_flux_pipeline(tmp_path / "flux", guidance_embeds=dev)
    want = load_model(str(folder)).network.state_dict()
    file = tmp_path / "flux1.safetensors"
    save_file({k: v.contiguous() for k, v in flux_to_single_file(want).items()}, str(file))
    assert detect_layout(flux_to_single_file(want)) is (FLUX_DEV if dev else FLUX_SCHNELL)
    loaded = load_model(str(file), config=str(folder))
    assert loaded.adapter.name == "flux" and loaded.source_kind == f"single-file {(FLUX_DEV if dev else FLUX_SCHNELL).name}"
    got = loaded.network.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--set", "sample.distilled_guidance=5.0")
    got = _pgraft_sample(tmp_path, file, 2, 3, "--config", folder, *prompts)
    assert torch.equal(got, _pgraft_sample(tmp_path, folder, 2, 3, *prompts))


def test_sd3_file_samples_the_images_of_its_folder_with_every_weight_of_it(tmp_path):
    """An SD3 file with T5 (MMDiT, VAE, CLIP-L, CLIP-G, T5 under SAI's prefixes) loads with --config as the folder's
    pipeline, every network in eval mode (diffusers 0.42 leaves its T5 training: dropout), and samples its images;
    a file of the bare MMDiT is put into the folder's pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from conftest import build_tiny_sd3_pipeline

    folder = build_tiny_sd3_pipeline(tmp_path / "sd3", t5=True, released=True)
    want = StableDiffusion3Pipeline.from_pretrained(str(folder))
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    state = sd3_to_single_file(*(getattr(want, p).state_dict() for p in parts))
    assert detect_layout(state) is SD3_MEDIUM
    file, bare = tmp_path / "sd3_medium.safetensors", tmp_path / "mmdit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    save_file({k: v.contiguous() for k, v in mmdit_to_single_file(want.transformer.state_dict()).items()}, str(bare))
    assert detect_layout(mmdit_to_single_file(want.transformer.state_dict())).network == "SD3Transformer2DModel"
    for source in (file, bare):
        loaded = load_model(str(source), config=str(folder))
        assert loaded.adapter.name == "sd3" and loaded.source_kind == "single-file SD3 medium"
        for part in parts:
            module = getattr(loaded.pipeline, part)
            got, ref = module.state_dict(), getattr(want, part).state_dict()
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), part
            assert not module.training, part
    message = _fail("inspect", file)
    assert "is a SD3 medium single-file checkpoint" in message and "stable-diffusion-3-medium-diffusers" in message
    prompts = ("--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--guidance-scale", "3")
    got = _pgraft_sample(tmp_path, file, 2, 3, "--config", folder, *prompts)
    assert torch.equal(got, _pgraft_sample(tmp_path, folder, 2, 3, *prompts))


def test_loading_passes_diffusers_the_dtype_argument_it_has_not_deprecated(tmp_path, tiny_sd_dir, monkeypatch):
    """pgraft loaded every folder and single file with ``torch_dtype=``, which diffusers deprecates from 0.40 (a
    warning pgraft silences; removed in 1.0): ``dtype=`` there, ``torch_dtype=`` before."""
    import re

    import diffusers
    from diffusers import DiffusionPipeline
    from diffusers.loaders.single_file import FromSingleFileMixin

    file = _single_file(tiny_sd_dir, tmp_path / "model.safetensors")
    calls = []
    for owner, name in ((DiffusionPipeline, "from_pretrained"), (FromSingleFileMixin, "from_single_file")):
        def spy(cls, *args, _original=getattr(owner, name).__func__, _name=name, **kwargs):
            calls.append((_name, set(kwargs)))
            return _original(cls, *args, **kwargs)
        monkeypatch.setattr(owner, name, classmethod(spy))
    load_model(str(tiny_sd_dir))
    load_model(str(file), config=str(tiny_sd_dir))
    first = {name: kw for name, kw in reversed(calls)}  # each method's first (outermost) call: pgraft's
    assert set(first) == {"from_pretrained", "from_single_file"}
    new = tuple(int(p) for p in re.findall(r"\d+", diffusers.__version__)[:2]) >= (0, 40)
    for kw in first.values():
        assert ("dtype" in kw and "torch_dtype" not in kw) if new else "torch_dtype" in kw, kw
