"""Every loading path of ``load_model`` on tiny random diffusers models, good input and bad."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pgraft_cli.io.checkpoints import describe, load_model, read_safetensors_metadata, save_pgraft_safetensors, sha256_file
from pgraft_cli.errors import ModelLoadError, PgraftError, UnsafeFileError
from pgraft_cli.core.samplers import sample

from conftest import build_scheduler, build_tiny_unet, cli_in_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numels(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unet_output(model, seed: int = 0, class_labels=None) -> torch.Tensor:
    """The network's prediction on a fixed input, through pgraft's ``predict``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.sample_shape, generator=g)
    cond = model.encode(None, class_labels, 1.0)
    return model.predict(x, torch.tensor(0.5, dtype=torch.float64), cond)


def check_description(model, *, family, prediction_type, conditioning, sample_shape, scheduler,
                      source_kind, num_classes=None):
    info = describe(model)
    json.dumps(info)  # plain data: what `inspect --json` prints
    assert info["family"] == family
    assert info["prediction_type"] == prediction_type
    assert info["conditioning"] == conditioning
    assert info["num_classes"] == num_classes
    assert info["sample_shape"] == list(sample_shape)
    assert info["parameters"] == numels(model.network) > 0
    assert info["dtype"] == "float32"
    assert info["scheduler"] == scheduler
    assert info["source_kind"] == source_kind
    assert info["num_train_timesteps"] == 1000
    assert isinstance(info["identity"], str) and info["identity"]
    assert not model.network.training
    return info


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ==============================================================================================
# 1. Pixel-space UNet2DModel


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_pipeline_folder(unet_pipeline_dir, prediction_type):
    folder = unet_pipeline_dir("ddpm", prediction_type, channels=3)
    model = load_model(str(folder))
    info = check_description(model, family="diffusion", prediction_type=prediction_type, conditioning="none",
                             sample_shape=(3, 8, 8), scheduler="DDPMScheduler", source_kind="pipeline-folder")
    assert info["latent"] is False and info["image_shape"] == [3, 8, 8] and info["shift"] is None
    assert_same_weights(model.network, build_tiny_unet(3))
    # Pixel models decode by rescaling [-1, 1] to [0, 1].
    assert torch.equal(model.decode(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])), torch.tensor([0, 0, 0.5, 1, 1]))


def test_ddim_pipeline_folder(unet_pipeline_dir):
    model = load_model(str(unet_pipeline_dir("ddim")))
    check_description(model, family="diffusion", prediction_type="epsilon", conditioning="none",
                      sample_shape=(1, 8, 8), scheduler="DDIMScheduler", source_kind="pipeline-folder")


def test_flow_pipeline_folder(unet_pipeline_dir):
    model = load_model(str(unet_pipeline_dir("flow", shift=2.0)))
    info = check_description(model, family="flow", prediction_type="flow", conditioning="none",
                             sample_shape=(1, 8, 8), scheduler="FlowMatchEulerDiscreteScheduler",
                             source_kind="pipeline-folder")
    assert info["shift"] == 2.0


def test_kind_overrides_the_scheduler(unet_pipeline_dir):
    folder = unet_pipeline_dir("ddpm")
    assert load_model(str(folder), kind="flow").family == "flow"
    assert load_model(str(unet_pipeline_dir("flow")), kind="diffusion").family == "diffusion"


@pytest.mark.parametrize("scheduler", ["flow", "ddpm"])
def test_model_folder_with_scheduler_config(unet_model_dir, scheduler):
    folder = unet_model_dir(scheduler)
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    model = load_model(str(folder))
    flow = scheduler == "flow"
    check_description(model, family="flow" if flow else "diffusion", prediction_type="flow" if flow else "epsilon",
                      conditioning="none", sample_shape=(1, 8, 8),
                      scheduler="FlowMatchEulerDiscreteScheduler" if flow else "DDPMScheduler",
                      source_kind="model-folder")
    assert_same_weights(model.network, build_tiny_unet(1))


def test_model_folder_with_scheduler_subfolder_beside_it(unet_pipeline_dir):
    # The unet/ folder of a pipeline: its scheduler is in ../scheduler/.
    model = load_model(str(unet_pipeline_dir("flow") / "unet"))
    assert model.family == "flow" and model.source_kind == "model-folder"


def test_model_folder_without_scheduler_needs_kind(unet_model_dir):
    folder = unet_model_dir(None)
    with pytest.raises(ModelLoadError, match="--kind") as exc:
        load_model(str(folder))
    assert "\n" not in str(exc.value)
    flow = load_model(str(folder), kind="flow")
    check_description(flow, family="flow", prediction_type="flow", conditioning="none", sample_shape=(1, 8, 8),
                      scheduler="FlowMatchEulerDiscreteScheduler", source_kind="model-folder")
    diffusion = load_model(str(folder), kind="diffusion")
    check_description(diffusion, family="diffusion", prediction_type="epsilon", conditioning="none",
                      sample_shape=(1, 8, 8), scheduler="DDPMScheduler", source_kind="model-folder")


def test_bare_safetensors_with_config_json_or_folder(tmp_path, unet_model_dir):
    folder = unet_model_dir("flow")
    weights = tmp_path / "weights.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(ModelLoadError, match="--config"):
        load_model(str(weights))
    for config in (folder / "config.json", folder):
        model = load_model(str(weights), config=str(config))
        check_description(model, family="flow", prediction_type="flow", conditioning="none", sample_shape=(1, 8, 8),
                          scheduler="FlowMatchEulerDiscreteScheduler", source_kind="safetensors+config")
        assert_same_weights(model.network, build_tiny_unet(1))
        assert model.source == str(weights)
    # A config.json with no scheduler config anywhere near it: --kind decides.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "config.json", lone / "config.json")
    with pytest.raises(ModelLoadError, match="--kind"):
        load_model(str(weights), config=str(lone / "config.json"))
    assert load_model(str(weights), config=str(lone / "config.json"), kind="diffusion").family == "diffusion"
    # a corrector of the weights loads without --config: its file records the config it was made with
    made = corrected_file_of(load_model(str(weights), config=str(folder / "config.json")), tmp_path / "c.safetensors")
    assert load_model(str(made)).corrector is not None


def test_bare_safetensors_with_pipeline_folder_as_config(tmp_path, unet_pipeline_dir):
    folder = unet_pipeline_dir("ddim", "v_prediction")
    other = build_tiny_unet(1, seed=5)
    weights = tmp_path / "finetuned.safetensors"
    save_file(other.state_dict(), str(weights))
    model = load_model(str(weights), config=str(folder))
    assert model.family == "diffusion" and model.schedule.prediction_type == "v_prediction"
    assert_same_weights(model.network, other)
    assert model.source == str(weights) and model.source_kind == "safetensors+config"


def test_pgraft_safetensors_round_trip(tmp_path, unet_pipeline_dir):
    original = load_model(str(unet_pipeline_dir("ddpm", "v_prediction", channels=3)))
    path = save_pgraft_safetensors(tmp_path / "model.safetensors", original.network, original.model_class,
                                   original.model_config, original.scheduler_config,
                                   {"training": {"steps": 3}}, extra={"pgraft.data": "digits"})
    assert not list(tmp_path.glob("*.tmp*")), "the atomic write left a temporary file behind"
    meta = read_safetensors_metadata(path)
    assert meta["pgraft.model_class"] == "UNet2DModel" and meta["pgraft.format_version"] == "1"
    loaded = load_model(str(path))  # needs nothing beside it
    info = check_description(loaded, family="diffusion", prediction_type="v_prediction", conditioning="none",
                             sample_shape=(3, 8, 8), scheduler="DDPMScheduler", source_kind="pgraft-safetensors")
    assert info["default_data"] == "digits"
    assert info["provenance"]["training"] == {"steps": 3}
    assert {"pgraft_version", "torch_version", "created"} <= set(info["provenance"])
    assert info["parameters"] == describe(original)["parameters"]
    assert_same_weights(loaded.network, original.network)
    torch.testing.assert_close(unet_output(loaded), unet_output(original), rtol=0, atol=0)
    assert loaded.schedule == original.schedule
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, original.schedule.alphas_cumprod)
    # Same file, same identity; identity is the file's sha256.
    assert load_model(str(path)).identity == loaded.identity and len(loaded.identity) == 64


def test_a_corrector_whose_base_was_overwritten_by_a_corrector_is_one_error(tmp_path):
    """A base file overwritten by its own corrector (`correct m.safetensors --out m.safetensors`, now refused)
    made loading recurse without end; it is one line naming the file and --base."""
    import shutil

    digits = load_model("digits")
    base = save_pgraft_safetensors(tmp_path / "m.safetensors", digits.network, digits.model_class, digits.model_config,
                                   digits.scheduler_config, {})
    corrected = corrected_file_of(load_model(str(base)), tmp_path / "c.safetensors")
    assert load_model(str(corrected)).corrector is not None
    shutil.copyfile(corrected, base)
    for path in (base, corrected):
        with pytest.raises(PgraftError, match="which is itself a corrector file, not a base model") as err:
            load_model(str(path))
        assert "--base" in str(err.value) and "\n" not in str(err.value)


def test_a_corrector_of_a_fine_tuned_file_loads_and_a_fine_tune_over_its_base_does_not(tmp_path):
    """`pgraft correct tuned.safetensors` is allowed: its corrector's base is a fine-tune file and must load;
    a fine-tune whose recorded base became a fine-tune file (overwritten) is refused."""
    import shutil

    from pgraft_cli.io.checkpoints import base_info_of, save_finetuned
    from pgraft_cli.io.recipes import FinetuneConfig
    from pgraft_cli.models.lora import add_lora

    digits = load_model("digits")
    base = save_pgraft_safetensors(tmp_path / "m.safetensors", digits.network, digits.model_class, digits.model_config,
                                   digits.scheduler_config, {})
    model = load_model(str(base))
    info = base_info_of(model)
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    tuned = save_finetuned(tmp_path / "t.safetensors", model, info, FinetuneConfig(cutoff=0.5, lora_rank=2, lora_alpha=2),
                           {}, {})
    corrected = corrected_file_of(load_model(str(tuned)), tmp_path / "c.safetensors")
    again = load_model(str(corrected))
    assert again.corrector is not None and again.finetuned and again.lora
    shutil.copyfile(tuned, base)  # the fine-tune's base overwritten by the fine-tune
    with pytest.raises(PgraftError, match="which is itself a finetune file"):
        load_model(str(tuned))


def test_damaged_pgraft_metadata_is_one_error(tmp_path):
    digits = load_model("digits")
    plain = save_pgraft_safetensors(tmp_path / "m.safetensors", digits.network, digits.model_class, digits.model_config,
                                    digits.scheduler_config, {})
    corrected = corrected_file_of(digits, tmp_path / "c.safetensors")
    damage = {plain: {"pgraft.provenance": "{not json", "pgraft.model_config": "[1, 2]"},
              corrected: {"pgraft.provenance": "[]", "pgraft.base": "null", "pgraft.corrector_inversion": "3"}}
    for path, entries in damage.items():
        state, meta = load_file(str(path)), read_safetensors_metadata(path)
        for key, value in [*entries.items(), *([("pgraft.base", None)] if path == corrected else [])]:
            bad = tmp_path / f"bad-{path.stem}-{key}.safetensors"
            changed = {k: v for k, v in meta.items() if k != key}
            if value is not None:
                changed[key] = value
            save_file(state, str(bad), metadata=changed)
            with pytest.raises(ModelLoadError, match="damaged pgraft metadata") as err:
                load_model(str(bad))
            assert "\n" not in str(err.value), key


def test_pgraft_safetensors_without_scheduler_needs_kind(tmp_path, tiny_unet):
    unet = tiny_unet(1)
    path = save_pgraft_safetensors(tmp_path / "m.safetensors", unet, "UNet2DModel", dict(unet.config), None, {})
    with pytest.raises(ModelLoadError, match="--kind"):
        load_model(str(path))
    assert load_model(str(path), kind="flow").family == "flow"


def test_class_conditional_unet(unet_pipeline_dir, tmp_path):
    folder = unet_pipeline_dir("flow", num_class_embeds=10)
    model = load_model(str(folder))
    check_description(model, family="flow", prediction_type="flow", conditioning="class", num_classes=10,
                      sample_shape=(1, 8, 8), scheduler="FlowMatchEulerDiscreteScheduler",
                      source_kind="pipeline-folder")
    cond = model.encode(None, [3, 7], 1.0)
    assert cond.class_labels.tolist() == [3, 7]
    a, b = unet_output(model, class_labels=[3, 7]), unet_output(model, class_labels=[7, 3])
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)
    # The class count survives a pgraft round trip.
    path = save_pgraft_safetensors(tmp_path / "c.safetensors", model.network, model.model_class, model.model_config,
                                   model.scheduler_config, {})
    again = load_model(str(path))
    assert again.conditioning == "class" and again.num_classes == 10
    torch.testing.assert_close(unet_output(again, class_labels=[3, 7]), a, rtol=0, atol=0)


def test_pixel_sampling_is_deterministic(unet_pipeline_dir):
    model = load_model(str(unet_pipeline_dir("ddim")))
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = model.encode(None, None, 1.0)
    runs = [sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, model.schedule.grid(3))[0]
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()
    images = model.decode(runs[0])
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


# ==============================================================================================
# 2-3. Text-to-image pipelines


def sample_text(model, prompts, guidance_scale=2.0, steps=2, seed=0):
    cond = model.encode(prompts, None, guidance_scale=guidance_scale)
    noise = torch.randn(len(prompts), *model.sample_shape, generator=torch.Generator().manual_seed(seed))
    x, _ = sample(lambda x, t: model.predict(x, t, cond), model.schedule, noise, model.schedule.grid(steps))
    return model.decode(x)


def check_text_sampling(model):
    prompts = ["a red square", "a blue circle"]
    images = sample_text(model, prompts)
    assert images.shape == (2, *model.image_shape) == (2, 3, 16, 16)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, sample_text(model, prompts)), "same seed, same prompts: same images"
    assert not torch.equal(images[0], images[1])
    unguided = sample_text(model, prompts, guidance_scale=1.0)
    assert unguided.shape == images.shape and not torch.equal(unguided, images)


def test_stable_diffusion_pipeline(tiny_sd_dir):
    model = load_model(str(tiny_sd_dir))
    info = check_description(model, family="diffusion", prediction_type="epsilon", conditioning="text",
                             sample_shape=(4, 8, 8), scheduler="DDIMScheduler", source_kind="pipeline-folder")
    assert info["model_class"] == "UNet2DConditionModel"
    assert info["latent"] is True and info["image_shape"] == [3, 16, 16]
    assert info["parameters"] == numels(model.pipeline.unet)  # the denoiser only, not the encoders
    check_text_sampling(model)


def test_stable_diffusion_unet_alone_is_refused(tiny_sd_dir):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(str(tiny_sd_dir / "unet"))


def test_stable_diffusion_weights_with_pipeline_config(tmp_path, tiny_sd_dir):
    state = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    state = {k: v + 0.01 for k, v in state.items()}
    weights = tmp_path / "unet-tuned.safetensors"
    save_file(state, str(weights))
    model = load_model(str(weights), config=str(tiny_sd_dir))
    assert model.conditioning == "text" and model.latent and model.source_kind == "safetensors+config"
    torch.testing.assert_close(model.network.state_dict(), state, rtol=0, atol=0)


def test_weights_with_a_pipeline_config_are_keyed_by_the_pipelines_files(tmp_path, tiny_sd_dir, monkeypatch):
    """The identity was the weights' sha256 alone: a VAE changed in the --config folder reused the run's
    cached images. Composed files record the folder (and their base) as absolute paths."""
    import shutil

    from pgraft_cli.io.checkpoints import model_key

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd_dir, folder)
    weights = tmp_path / "unet.safetensors"
    shutil.copyfile(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors", weights)
    before = load_model(str(weights), config=str(folder))
    assert before.identity.startswith(sha256_file(weights) + "+") and before.config_dir == str(folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    changed = {k: v * 1.01 for k, v in load_file(str(vae)).items()}
    save_file(changed, str(vae))
    after = load_model(str(weights), config=str(folder))
    assert after.identity != before.identity and model_key(after) != model_key(before)

    # a corrector of it, made in one folder by relative paths, loads from another without --config
    monkeypatch.chdir(tmp_path)
    made = corrected_file_of(load_model("unet.safetensors", config="pipe"), tmp_path / "c.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_model(str(made))
    assert again.corrector is not None and again.identity != after.identity and again.base_identity == after.identity
    # a file made before recorded the weights' sha256 alone as its base's identity: still composed
    state, meta = load_file(str(made)), read_safetensors_metadata(made)
    info = json.loads(meta["pgraft.base"])
    for identity, loads in ((sha256_file(weights), True), (sha256_file(weights)[::-1], False)):
        older = tmp_path / f"older-{loads}.safetensors"
        save_file(state, str(older), metadata={**meta, "pgraft.base": json.dumps({**info, "identity": identity})})
        if loads:
            assert load_model(str(older)).corrector is not None
        else:
            with pytest.raises(PgraftError, match="is not the model"):
                load_model(str(older))


def test_pgraft_file_of_a_text_model_needs_its_pipeline(tmp_path, tiny_sd_dir):
    base = load_model(str(tiny_sd_dir))
    path = save_pgraft_safetensors(tmp_path / "tuned.safetensors", base.network, base.model_class, base.model_config,
                                   base.scheduler_config, {"training": {"rounds": 1}})
    with pytest.raises(ModelLoadError, match="--config") as exc:
        load_model(str(path))
    assert "text encoders" in str(exc.value) and "\n" not in str(exc.value)
    model = load_model(str(path), config=str(tiny_sd_dir))
    assert model.conditioning == "text" and model.latent and model.identity != base.identity
    assert model.provenance["training"] == {"rounds": 1}  # the file's provenance, not the pipeline's
    assert_same_weights(model.network, base.network)


def test_half_precision_pipeline_loads_in_float32(tmp_path, tiny_sd_dir):
    folder = tmp_path / "sd-fp16"
    shutil.copytree(tiny_sd_dir, folder)
    for weights in folder.rglob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    model = load_model(str(folder))
    assert model.dtype == torch.float32 and describe(model)["dtype"] == "float32"
    assert model.vae.dtype == torch.float32 and model.pipeline.text_encoder.dtype == torch.float32
    images = sample_text(model, ["a red square"], steps=1)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_image_conditioned_pipeline_is_refused(tmp_path, tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "sd-inpaint"
    shutil.copytree(tiny_sd_dir, folder)
    config = dict(UNet2DConditionModel.load_config(str(folder / "unet")), in_channels=9)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ModelLoadError, match="text-to-image"):
        load_model(str(folder))


def test_sd3_pipeline_without_t5(tiny_sd3_dir):
    index = json.loads((tiny_sd3_dir / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]  # saved without T5
    model = load_model(str(tiny_sd3_dir))
    info = check_description(model, family="flow", prediction_type="flow", conditioning="text",
                             sample_shape=(4, 8, 8), scheduler="FlowMatchEulerDiscreteScheduler",
                             source_kind="pipeline-folder")
    assert info["model_class"] == "SD3Transformer2DModel"
    assert info["shift"] == 3.0 and model.schedule.shift == 3.0
    assert info["latent"] is True and info["image_shape"] == [3, 16, 16]
    assert model.pipeline.text_encoder_3 is None
    check_text_sampling(model)


# ==============================================================================================
# 4. Bad input


def test_unsupported_variants_are_refused(tmp_path, unet_model_dir):
    # A UNet2DModel that needs class inputs of a kind pgraft cannot make.
    odd = tmp_path / "odd"
    build_tiny_unet(1, class_embed_type="identity").save_pretrained(odd)
    build_scheduler("ddpm").save_config(odd)
    with pytest.raises(ModelLoadError, match="extra conditioning"):
        load_model(str(odd))
    # A zero-terminal-SNR schedule pgraft's sampler does not implement.
    zsnr = unet_model_dir()
    from diffusers import DDIMScheduler

    DDIMScheduler(rescale_betas_zero_snr=True).save_config(zsnr)
    with pytest.raises(ModelLoadError, match="rescale_betas_zero_snr"):
        load_model(str(zsnr))
    # A pgraft file whose header is damaged.
    damaged = tmp_path / "damaged.safetensors"
    save_file(build_tiny_unet(1).state_dict(), str(damaged),
              metadata={"pgraft.model_class": "UNet2DModel", "pgraft.model_config": "{not json"})
    with pytest.raises(ModelLoadError, match="damaged pgraft metadata"):
        load_model(str(damaged))
    # A class pgraft does not load.
    vae = tmp_path / "vae"
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(vae)
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(str(vae), kind="flow")


@pytest.fixture
def pickles(tmp_path):
    """A model folder (config + flow scheduler) and the same weights as .ckpt/.pt/.bin files."""
    unet = build_tiny_unet(1, seed=3)
    folder = tmp_path / "cfg"
    unet.save_pretrained(folder, safe_serialization=True)
    build_scheduler("flow").save_config(folder)
    files = {}
    for suffix in (".ckpt", ".pt", ".bin"):
        files[suffix] = tmp_path / f"weights{suffix}"
        obj = {"state_dict": unet.state_dict()} if suffix == ".ckpt" else unet.state_dict()
        torch.save(obj, files[suffix])
    return unet, folder, files


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_refused_unless_allowed(pickles, suffix):
    unet, folder, files = pickles
    with pytest.raises(UnsafeFileError, match="--allow-pickle") as exc:
        load_model(str(files[suffix]), config=str(folder))
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelLoadError, match="--config"):
        load_model(str(files[suffix]), allow_pickle=True)
    model = load_model(str(files[suffix]), config=str(folder / "config.json"), allow_pickle=True)
    assert model.family == "flow" and model.source_kind == "safetensors+config"
    assert_same_weights(model.network, unet)


def test_model_folder_with_only_bin_weights(tmp_path):
    unet = build_tiny_unet(1, seed=4)
    folder = tmp_path / "binonly"
    unet.save_pretrained(folder, safe_serialization=False)
    build_scheduler("ddpm").save_config(folder)
    assert not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin"))
    with pytest.raises(UnsafeFileError, match="--allow-pickle"):
        load_model(str(folder))
    model = load_model(str(folder), allow_pickle=True)
    assert_same_weights(model.network, unet)


def test_pipeline_folder_with_only_bin_weights(tmp_path):
    from diffusers import DDPMPipeline

    folder = tmp_path / "binpipe"
    DDPMPipeline(unet=build_tiny_unet(1), scheduler=build_scheduler("ddpm")).save_pretrained(
        folder, safe_serialization=False)
    with pytest.raises(UnsafeFileError, match="--allow-pickle"):
        load_model(str(folder))
    assert load_model(str(folder), allow_pickle=True).family == "diffusion"


@pytest.fixture
def bad_inputs(tmp_path, unet_model_dir, unet_pipeline_dir):
    """name -> (path, extra load_model kwargs, regex the message must match)."""
    good = unet_model_dir("flow")
    pgraft_file = save_pgraft_safetensors(tmp_path / "good.safetensors", build_tiny_unet(1), "UNet2DModel",
                                          dict(build_tiny_unet(1).config), build_scheduler("flow").config, {})
    truncated = tmp_path / "truncated.safetensors"
    data = pgraft_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all\n" * 20)
    ckpt = tmp_path / "model.ckpt"
    torch.save(build_tiny_unet(1).state_dict(), ckpt)
    binonly = tmp_path / "binonly"
    build_tiny_unet(1).save_pretrained(binonly, safe_serialization=False)
    build_scheduler("flow").save_config(binonly)
    # Weights that do not match their config: a config with wider blocks.
    wide = tmp_path / "wide"
    build_tiny_unet(1, block_out_channels=(16, 32)).save_config(wide)
    build_scheduler("flow").save_config(wide)
    mismatched_folder = tmp_path / "mismatched"
    shutil.copytree(good, mismatched_folder)
    shutil.copy(wide / "config.json", mismatched_folder / "config.json")
    mismatched_pipe = unet_pipeline_dir("flow")
    shutil.copy(wide / "config.json", mismatched_pipe / "unet" / "config.json")
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    bad_json = tmp_path / "badjson"
    shutil.copytree(good, bad_json)
    (bad_json / "config.json").write_text("{not json")
    return {
        "ckpt": (ckpt, {}, "pickle.*--allow-pickle"),
        "bin-only folder": (binonly, {}, "pickle.*--allow-pickle"),
        "truncated": (truncated, {}, "truncated or corrupt"),
        "garbage": (garbage, {}, "truncated or corrupt"),
        "mismatched config": (good / "diffusion_pytorch_model.safetensors", {"config": str(wide / "config.json")},
                              "do not match the model config"),
        "mismatched folder": (mismatched_folder, {}, "config.json"),
        "mismatched pipeline": (mismatched_pipe, {}, "pipeline"),
        "missing": (tmp_path / "does-not-exist.safetensors", {}, "no such file or directory"),
        "missing relative": (Path("no-such-dir/model.safetensors"), {}, "no such file or directory"),
        "neither": (neither, {}, "model_index.json or config.json"),
        "bad json": (bad_json, {}, "not a readable JSON"),
        "unknown suffix": (neither / "notes.txt", {}, "unknown checkpoint type"),
        "missing config": (good / "diffusion_pytorch_model.safetensors", {"config": str(tmp_path / "nope.json")},
                           "no such file"),
    }


BAD = ["ckpt", "bin-only folder", "truncated", "garbage", "mismatched config", "mismatched folder",
       "mismatched pipeline", "missing", "missing relative", "neither", "bad json", "unknown suffix",
       "missing config"]
# Through the CLI too (each is a fresh interpreter, so only the kinds of failure that differ).
CLI_BAD = ["ckpt", "bin-only folder", "truncated", "garbage", "mismatched config", "mismatched pipeline", "missing",
           "neither"]


def test_bad_input_raises_one_line_model_load_error(bad_inputs):
    assert sorted(bad_inputs) == sorted(BAD)
    for name, (path, kwargs, pattern) in bad_inputs.items():
        with pytest.raises(ModelLoadError, match=pattern) as exc:
            load_model(str(path), **kwargs)
        message = str(exc.value)
        assert "\n" not in message and message.strip() == message, (name, message)
        assert "; " in message, f"{name}: the message should say what to do: {message}"


def run_inspect(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pgraft_cli", "inspect", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "300",
                                 "OMP_NUM_THREADS": "1", **(env or {})})


IN_A_FRESH_PROCESS = {"garbage", "hub"}  # the rest through the same console entry in this process


def test_cli_errors_are_one_line_and_loading_is_quiet(bad_inputs, tiny_sd3_dir, monkeypatch):
    cases = {name: (str(path), *[a for k, v in kw.items() for a in (f"--{k}", v)])
             for name, (path, kw, _) in bad_inputs.items() if name in CLI_BAD}
    cases["hub"] = ("nonexistent-org/nonexistent-model",)
    # A fresh process is mostly interpreter start-up and imports: two bad inputs and the good one run
    # in their own processes (at once), the other bad inputs through the same entry in this one.
    procs = {name: run_inspect(*args) for name, args in cases.items() if name in IN_A_FRESH_PROCESS}
    good = run_inspect(str(tiny_sd3_dir), "--json")
    for key, value in {"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "300"}.items():
        monkeypatch.setenv(key, value)
    results = {name: cli_in_process("inspect", *args) for name, args in cases.items() if name not in procs}
    results.update({name: (p.communicate(timeout=180), p.returncode) for name, p in procs.items()})
    assert sorted(results) == sorted(cases)
    for name, ((stdout, stderr), code) in results.items():
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (name, code, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, stderr)
        assert stdout == "", (name, stdout)
        if name in bad_inputs:
            assert re.search(bad_inputs[name][2], lines[0]), (name, lines[0])
    hub = [line for line in results["hub"][0][1].splitlines() if line.strip()][0]
    assert "hub" in hub and "download" in hub and "nonexistent-org/nonexistent-model" in hub
    # A pipeline that loads: JSON on stdout, and no library progress bars or notes on stderr.
    stdout, stderr = good.communicate(timeout=180)
    assert good.returncode == 0, stderr
    assert stderr.strip() == ""
    info = json.loads(stdout)
    assert info["family"] == "flow" and info["shift"] == 3.0 and info["conditioning"] == "text"


# ==============================================================================================
# 5. The bundled model


def test_inspect_digits_json():
    from typer.testing import CliRunner

    from pgraft_cli.cli import app

    result = CliRunner().invoke(app, ["inspect", "digits", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "flow" and info["prediction_type"] == "flow"
    assert info["conditioning"] == "none" and info["num_classes"] is None
    assert info["sample_shape"] == [1, 16, 16] and info["image_shape"] == [1, 16, 16] and info["latent"] is False
    assert info["default_data"] == "digits-train" and info["default_eval_data"] == "digits-test"
    assert info["source_kind"] == "pgraft-safetensors" and info["model_class"] == "UNet2DModel"
    assert "training" in info["provenance"]
    assert info["parameters"] == load_model("digits").parameter_count()


# ----------------------------------------------------------------------------------------------
# Identity: what a cached stage is keyed by


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding ``org/tiny`` at two commits; returns a function that
    points ``refs/main`` at one of them (as ``hf download`` after an upstream update would)."""
    import huggingface_hub.constants as hub_constants
    from diffusers import DDPMPipeline

    repo = tmp_path / "hub" / "models--org--tiny"
    for commit, seed in (("a" * 40, 0), ("b" * 40, 1)):
        pipe = DDPMPipeline(unet=build_tiny_unet(seed=seed), scheduler=build_scheduler("ddpm"))
        pipe.save_pretrained(repo / "snapshots" / commit, safe_serialization=True)
    (repo / "refs").mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def point_main_at(commit: str) -> None:
        (repo / "refs" / "main").write_text(commit)

    return point_main_at


def test_a_hub_model_is_identified_by_its_snapshot_commit(hub_cache, capfd):
    hub_cache("a" * 40)
    first = load_model("org/tiny")
    assert first.identity == "hub:org/tiny@" + "a" * 40
    assert first.source == "org/tiny" and first.source_kind == "hub"
    assert load_model("org/tiny").identity == first.identity
    hub_cache("b" * 40)  # upstream updated the model: a new identity, and the new weights
    second = load_model("org/tiny")
    assert second.identity == "hub:org/tiny@" + "b" * 40
    assert not torch.equal(unet_output(first), unet_output(second))
    assert "Could not reach the Hub" not in capfd.readouterr().err  # the offline note is not printed


def test_a_hub_model_missing_from_the_offline_cache_is_one_whole_sentence(hub_cache):
    """diffusers' offline failure is a paragraph; the error line was its first 160 characters, cut mid-word
    ("... for the specified revision on the )")."""
    from pgraft_cli.errors import ModelLoadError

    hub_cache("a" * 40)
    with pytest.raises(ModelLoadError) as info:
        load_model("org/missing")
    message = str(info.value)
    assert "(it is not in the local Hugging Face cache, and the hub could not be reached)" in message
    assert message.endswith("(hf download org/missing --local-dir DIR) and pass DIR")


@pytest.mark.parametrize("error, expected", [("GatedRepoError", "the repository is gated: accept its licence"),
                                             ("RepositoryNotFoundError", "no such repository on the hub"),
                                             ("RevisionNotFoundError", "the hub has no such revision")])
@pytest.mark.parametrize("where", ["model_info", "download"])
def test_a_gated_or_missing_hub_repository_is_named_as_such_not_as_an_unreachable_hub(tmp_path, monkeypatch, error,
                                                                                      expected, where):
    """diffusers answers a refused model_info (401 gated, 404 misspelled) with its "not cached locally" paragraph,
    which read as "the hub could not be reached"; a gated repository's 401 can also come from the file download
    itself, unchained (its model_info is public). Either way the hub's error is named, without the advice for an
    unreachable hub."""
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils as hub_utils
    import requests
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    from pgraft_cli.errors import ModelLoadError

    def refuse(*args, **kwargs):
        response = requests.Response()
        response.status_code = 401 if error == "GatedRepoError" else 404
        raise getattr(hub_utils, error)(f"{response.status_code} Client Error", response=response)

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    if where == "model_info":
        monkeypatch.setattr(pipeline_utils, "model_info", refuse)
    else:
        monkeypatch.setattr(DiffusionPipeline, "download", classmethod(refuse))
    with pytest.raises(ModelLoadError) as info:
        load_model("org/some-model")
    message = str(info.value)
    assert expected in message and "could not be reached" not in message and "unreachable" not in message


def test_a_long_message_is_cut_at_a_word():
    from pgraft_cli.io.checkpoints import _short

    assert _short(ValueError("short one\nsecond line")) == "short one"
    cut = _short(ValueError("word " * 40 + "end"), limit=23)
    assert cut == "word word word word ..."


def test_model_key_holds_the_weights_of_what_is_composed_with_the_base(tmp_path):
    from pgraft_cli.io.checkpoints import model_key
    from pgraft_cli.models.corrector import NoiseCorrector
    from pgraft_cli.models.lora import add_lora

    model = load_model("digits")
    base = model_key(model)
    assert base == model_key(load_model("digits")) and base["identity"] == model.identity
    model.corrector = NoiseCorrector("gaussian-diag", 4, mean=torch.zeros(256), std=torch.ones(256))
    with_corrector = model_key(model)
    model.corrector.std = torch.full((256,), 2.0)  # another corrector of the same type and steps
    assert with_corrector != base and model_key(model) != with_corrector
    model.corrector = None
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    adapted = model_key(model)
    with torch.no_grad():
        next(p for n, p in model.network.named_parameters() if "lora_B" in n).add_(0.1)
    assert adapted != base and model_key(model)["lora"] != adapted["lora"]
    model.cutoff = 0.25
    assert model_key(model)["cutoff"] == 0.25


def test_a_lora_file_with_missing_adapter_tensors_is_refused(tmp_path):
    from pgraft_cli.models.lora import add_lora
    from pgraft_cli.io.checkpoints import base_info_of, save_finetuned
    from pgraft_cli.io.recipes import FinetuneConfig

    model = load_model("digits")
    add_lora(model.network, rank=2, alpha=2)
    model.lora, model.cutoff = True, 0.5
    path = save_finetuned(tmp_path / "tuned.safetensors", model, base_info_of(load_model("digits")),
                          FinetuneConfig(cutoff=0.5, lora_rank=2, lora_alpha=2), {}, {})
    assert load_model(str(path)).lora  # the complete file loads
    state, metadata = load_file(str(path)), read_safetensors_metadata(path)
    dropped = sorted(state)[:3]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(path), metadata=metadata)
    with pytest.raises(PgraftError) as err:
        load_model(str(path))
    message = str(err.value)
    assert "lacks 3 of the adapter's" in message and f"'{dropped[0]}'" in message and str(path) in message
    assert "\n" not in message


def corrected_file_of(model, path: Path) -> Path:
    """A Gaussian corrector file made from ``model`` (stores its base's source and identity)."""
    from pgraft_cli.io.checkpoints import save_corrected
    from pgraft_cli.models.corrector import NoiseCorrector

    dim = 1
    for n in model.sample_shape:
        dim *= n
    corrector = NoiseCorrector("gaussian-diag", 4, mean=torch.zeros(dim), std=torch.ones(dim))
    return save_corrected(path, corrector, model, {}, {})


def test_a_file_made_from_a_hub_model_loads_its_commit_after_an_upstream_update(hub_cache, tmp_path):
    hub_cache("a" * 40)
    base = load_model("org/tiny")
    path = corrected_file_of(base, tmp_path / "corrected.safetensors")
    hub_cache("b" * 40)  # upstream moved on; the file still names commit a
    loaded = load_model(str(path))
    assert loaded.base_identity == base.identity == "hub:org/tiny@" + "a" * 40 and loaded.corrector is not None
    assert torch.equal(unet_output(loaded), unet_output(base))


def test_a_hub_snapshot_folder_of_the_stored_commit_is_accepted_as_base(hub_cache, tmp_path):
    import huggingface_hub.constants as hub_constants

    hub_cache("a" * 40)
    base = load_model("org/tiny")
    path = corrected_file_of(base, tmp_path / "corrected.safetensors")
    snapshots = Path(hub_constants.HF_HUB_CACHE) / "models--org--tiny" / "snapshots"
    loaded = load_model(str(path), base=str(snapshots / ("a" * 40)))
    assert loaded.base_identity == base.identity and torch.equal(unet_output(loaded), unet_output(base))
    with pytest.raises(PgraftError) as err:  # another commit's snapshot is another model
        load_model(str(path), base=str(snapshots / ("b" * 40)))
    assert "a" * 40 in str(err.value) and "--base" in str(err.value) and "\n" not in str(err.value)


def test_a_hub_base_whose_commit_is_not_cached_offline_is_one_clear_line(hub_cache, tmp_path):
    import huggingface_hub.constants as hub_constants

    hub_cache("a" * 40)
    path = corrected_file_of(load_model("org/tiny"), tmp_path / "corrected.safetensors")
    hub_cache("b" * 40)
    shutil.rmtree(Path(hub_constants.HF_HUB_CACHE) / "models--org--tiny" / "snapshots" / ("a" * 40))
    with pytest.raises(PgraftError) as err:
        load_model(str(path))
    message = str(err.value)
    assert "org/tiny" in message and "a" * 40 in message and "\n" not in message
    assert "--revision " + "a" * 40 in message and "snapshots/" + "a" * 40 in message and "--base" in message


def test_hf_download_bookkeeping_is_not_part_of_a_folders_identity(tmp_path, unet_pipeline_dir):
    """`hf download --local-dir` writes .cache/huggingface/download/*.metadata with the download's time: every
    download of the same weights was another model (stages re-ran; composed files refused their base)."""
    import time

    from pgraft_cli.io.checkpoints import identity_of

    folder = unet_pipeline_dir("ddpm")
    before = load_model(str(folder)).identity
    meta = folder / ".cache" / "huggingface" / "download" / "unet" / "diffusion_pytorch_model.safetensors.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(f"abc123\netag\n{time.time()}\n")
    legacy = identity_of(folder, hidden=True)
    made = corrected_file_of(load_model(str(folder)), tmp_path / "c.safetensors")
    meta.write_text(f"abc123\netag\n{time.time() + 60}\n")  # downloaded again
    assert load_model(str(folder)).identity == before != legacy
    assert load_model(str(made)).corrector is not None
    # a file made before hidden folders left the identity recorded the legacy one: it still composes
    state, metadata = load_file(str(made)), read_safetensors_metadata(made)
    info = json.loads(metadata["pgraft.base"])
    meta.write_text(f"abc123\netag\n{time.time()}\n")
    older = tmp_path / "older.safetensors"
    save_file(state, str(older), metadata={**metadata, "pgraft.base": json.dumps({**info, "identity": identity_of(folder, hidden=True)})})
    assert load_model(str(older)).corrector is not None
    # the weights themselves still count
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 1 for k, v in load_file(str(weights)).items()}, str(weights))
    assert load_model(str(folder)).identity != before


def test_inspect_shows_each_provenance_value_not_a_cut_json():
    """`pgraft inspect digits` cut the provenance JSON at 400 characters, mid-object, hiding the training settings
    the README says it shows; each value has its own row now (a long one shortened; --json keeps them whole)."""
    from conftest import cli_run

    proc = cli_run("inspect", "digits")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the table wraps long rows
    provenance = load_model("digits").provenance
    assert {"training", "train_images", "final_loss", "data_note"} <= set(provenance)
    for key in ("training", "train_images", "final_loss", "data_note"):
        assert f"provenance: {key}" in text
    assert str(provenance["train_images"]) in text
