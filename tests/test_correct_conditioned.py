"""Inverse noise correction of conditioned models: each image inverted under its own label or
caption, a corrector conditioned on it, saved, loaded and applied with each sample's condition."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli_run
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.core.samplers import invert_sampler
from pgraft_cli.errors import PgraftError
from pgraft_cli.io.checkpoints import load_model, save_corrected
from pgraft_cli.io.data import data_rows, load_digits
from pgraft_cli.io.recipes import CorrectConfig
from pgraft_cli.models.corrector import NoiseCorrector
from pgraft_cli.models.loaded import Cond

runner = CliRunner()
TINY = ["--set", "correct.base_steps=2", "--set", "correct.num_images=24", "--set", "correct.inversion_iterations=6",
        "--set", "correct.invert_shard_size=12", "--set", "correct.corrector=gaussian-diag", "--set", "evaluate.num=8",
        "--set", "sample.batch_size=8", "--set", "correct.max_reconstruction_rms=1.0", "--set",
        "correct.max_dropped_fraction=0.5", "--set", "evaluate.kid_subsets=2", "--features", "classifier"]


def _class_flow(tmp_path):
    from conftest import build_scheduler, build_tiny_unet

    folder = tmp_path / "class-flow"  # 16 px: the digits' size
    build_tiny_unet(sample_size=16, num_class_embeds=10).save_pretrained(folder, safe_serialization=True)
    build_scheduler("flow").save_config(folder)
    return folder


def test_cond_rows_selects_every_per_row_input():
    cond = Cond(class_labels=torch.tensor([3, 4, 5]), prompt_embeds=torch.arange(6.0).view(3, 2),
                negative_prompt_embeds=torch.zeros(3, 2), extra={"m": torch.tensor([7, 8, 9])}, guidance_scale=2.0)
    part = cond.rows(torch.tensor([2, 0]))
    assert part.class_labels.tolist() == [5, 3] and part.prompt_embeds.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert part.negative_prompt_embeds.shape == (2, 2) and part.extra["m"].tolist() == [9, 7]
    assert part.guidance_scale == 2.0 and Cond().rows(torch.tensor([1])).class_labels is None


def test_data_rows_carry_the_digits_labels_and_a_folders_captions(tmp_path):
    rows = data_rows("digits-train", (1, 16, 16))
    assert torch.equal(rows.labels, load_digits(split="train")[1]) and rows.head(5).labels.tolist() == rows.labels[:5].tolist()
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(folder / f"{i}.png")
    (folder / "captions.txt").write_text("a cat\na dog\na cat\n")
    assert data_rows(str(folder), (1, 16, 16)).captions == ("a cat", "a dog", "a cat")
    given = tmp_path / "other.txt"
    given.write_text("x\ny\nz\n")
    assert data_rows(str(folder), (1, 16, 16), captions=str(given)).captions == ("x", "y", "z")
    given.write_text("x\ny\n")
    with pytest.raises(PgraftError, match="2 captions"):
        data_rows(str(folder), (1, 16, 16), captions=str(given))


def test_class_inversion_uses_each_images_own_label(tmp_path):
    """A shard of mixed labels: each image's noise is the one inverting it alone under its label gives."""
    from pgraft_cli.stages.correct import _invert_shard

    model = load_model(str(_class_flow(tmp_path)))
    images, labels = load_digits(split="train")
    x = images[:6] * 2 - 1
    cfg = CorrectConfig(base_steps=3, inversion_iterations=10, inversion_tol=1e-6)
    with torch.inference_mode():
        out = _invert_shard(model, x, cfg, 6, lambda n: None, classes=labels[:6].tolist())
        grid = model.schedule.grid(3)
        for i in range(6):
            c = Cond(class_labels=labels[i:i + 1])
            alone, _ = invert_sampler(lambda z, t: model.predict(z, t, c), model.schedule, x[i:i + 1], grid, 10, 1e-6)
            torch.testing.assert_close(out["noise"][i:i + 1], alone, atol=1e-5, rtol=0)
        other = _invert_shard(model, x, cfg, 6, lambda n: None, classes=[(c + 1) % 10 for c in labels[:6].tolist()])
    assert float((other["noise"] - out["noise"]).abs().max()) > 1e-3


def test_class_conditioned_gaussian_corrector_round_trips_through_the_file(tmp_path):
    model = load_model(str(_class_flow(tmp_path)))
    mean = torch.randn(10, 256, dtype=torch.float64)
    for kind, spread in (("gaussian-diag", {"std": torch.rand(10, 256) + 0.5}),
                         ("gaussian", {"chol": torch.eye(256).repeat(10, 1, 1) * 0.5})):
        corrector = NoiseCorrector(kind, 4, mean=mean.float(), conditioning="class", **spread)
        e = torch.randn(3, 1, 16, 16)
        z = corrector(e, torch.tensor([2, 0, 2]))
        scale = spread["std"][[2, 0, 2]] if kind == "gaussian-diag" else 0.5
        torch.testing.assert_close(z.flatten(1), (mean[[2, 0, 2]] + scale * e.flatten(1)).float(), atol=1e-5, rtol=0)
        path = save_corrected(tmp_path / f"{kind}.safetensors", corrector, model, {}, {})
        back = load_model(str(path)).corrector
        assert back.conditioning == "class" and back.kind == kind
        torch.testing.assert_close(back(e, torch.tensor([2, 0, 2])), z)


@pytest.mark.slow
def test_correct_a_class_conditional_flow_end_to_end_then_sample_by_class(tmp_path):
    folder = _class_flow(tmp_path)
    out = tmp_path / "corrected.safetensors"
    result = runner.invoke(app, ["correct", str(folder), "--data", "digits-train", "--out", str(out), "--run-dir",
                                 str(tmp_path / "run"), "--json", *TINY, "--set", "sample.guidance_scale=1"])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(out))
    c = loaded.corrector
    assert c.conditioning == "class" and c.mean.shape == (10, 256)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["pgraft.corrector_conditioning"] == "class"
    _, labels = load_digits(split="train")
    for k in range(10):  # the classes seen at least twice have their own mean
        if int((labels[:24] == k).sum()) >= 2:
            assert float((c.mean[k] - c.mean.mean(0)).abs().max()) > 0
    pngs = {}
    for k in (1, 7):
        s = runner.invoke(app, ["sample", str(out), "--num", "2", "--class", str(k), "--run-dir",
                                str(tmp_path / f"s{k}"), "--out", str(tmp_path / f"png{k}"), "--json"])
        assert s.exit_code == 0, s.output
        pngs[k] = (tmp_path / f"png{k}" / "00000.png").read_bytes()
    assert pngs[1] != pngs[7]


def test_class_models_need_labels_in_range_and_text_families_without_a_pooled_embedding_are_refused(
        tmp_path, unet_model_dir, tiny_pixart_dir):
    folder = unet_model_dir(scheduler="flow", num_class_embeds=3)
    cases = [[str(folder), "--data", "digits"], [str(tiny_pixart_dir), "--data", "digits", "--captions", "x"]]
    for args, needle in zip(cases, ("labels 0..9", "no pooled text embedding")):
        proc = cli_run("correct", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _invertible_sd(tmp_path):
    """The tiny SD pipeline with its UNet's head scaled by 0.05: a random epsilon head is no denoiser
    (its DDIM inverse leaves the latents' scale, see test_correct's diffusion test), a small one is."""
    from conftest import build_tiny_sd_pipeline
    from diffusers import UNet2DConditionModel

    folder = build_tiny_sd_pipeline(tmp_path / "sd")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


@pytest.mark.slow
def test_correct_a_text_to_image_model_with_captions_then_sample_with_prompts(tmp_path):
    from PIL import Image

    sd = _invertible_sd(tmp_path)

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i:02d}.png")
    captions = ["a red square", "a blue circle"] * 3 + ["a green star", "a tree"]
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    out = tmp_path / "corrected.safetensors"
    args = ["correct", str(sd), "--data", str(folder), "--json", *TINY, "--set", "correct.num_images=8",
            "--set", "correct.invert_shard_size=4", "--set", "sample.guidance_scale=2", "--features", "none"]
    result = runner.invoke(app, [*args, "--out", str(out), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(out))
    c = loaded.corrector
    embed_dim = loaded.pipeline.text_encoder.config.hidden_size
    assert c.conditioning == "text" and c.weight.shape == (embed_dim, c.mean.shape[-1])
    assert c.guidance_scale == 2.0  # fitted to the guided sampler: the file records its scale
    # the corrector's mean follows the prompt's pooled CLIP embedding: seen or not, prompts differ
    e = torch.zeros(3, *loaded.sample_shape)
    prompts = ["a blue circle", "a tree", "a prompt never seen"]
    means = c(e, c.condition_of(prompts, None, loaded.pooled_text))
    torch.testing.assert_close(means[0].flatten(), (c.mean + loaded.pooled_text(prompts[:1])[0] @ c.weight).flatten())
    assert float((means[1] - means[2]).abs().max()) > 1e-6 and float((means[0] - means[1]).abs().max()) > 1e-6
    pngs = []
    for k, prompt in enumerate(("a blue circle", "a prompt never seen")):
        s = runner.invoke(app, ["sample", str(out), "--num", "2", "--prompt", prompt, "--guidance-scale", "2",
                                "--run-dir", str(tmp_path / f"s{k}"), "--out", str(tmp_path / f"png{k}"), "--json"])
        assert s.exit_code == 0, s.output
        pngs.append((tmp_path / f"png{k}" / "00000.png").read_bytes())
    assert pngs[0] != pngs[1]
    # exported with the default recipe (guidance 5), the pipeline samples at the fitted 2 and refuses another
    from diffusers import DiffusionPipeline

    exported = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exp"), "--json"])
    assert exported.exit_code == 0, exported.output
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "exp"), trust_remote_code=True)
    assert pipe.config.guidance_scale == 2.0 and pipe.config.corrector_guidance == 2.0
    assert json.loads((tmp_path / "exp" / "pgraft_export.json").read_text())["guidance_scale"] == 2.0
    with pytest.raises(ValueError, match="fitted to the base sampler at guidance 2; pass guidance_scale=2"):
        pipe(prompt="a tree", num_inference_steps=loaded.corrector.base_steps, guidance_scale=5.0, output_type="latent")
    # the inversion used each image's caption: another caption for image 0 changes its noise only
    from safetensors.torch import load_file

    first = load_file(str(tmp_path / "run" / "invert" / "shard-00000.safetensors"))["noise"]
    (folder / "captions.txt").write_text("\n".join(["a tree", *captions[1:]]) + "\n")
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "c2.safetensors"), "--run-dir", str(tmp_path / "run2")])
    assert again.exit_code == 0, again.output
    second = load_file(str(tmp_path / "run2" / "invert" / "shard-00000.safetensors"))["noise"]
    assert float((second[0] - first[0]).abs().max()) > 1e-4
    torch.testing.assert_close(second[1:], first[1:])


def test_fit_gaussian_by_class_fits_own_tied_and_pooled_gaussians():
    """A class with more samples than dimensions: its own fit. One with at least 2: its own mean and the tied
    within-class covariance (it took the pooled mean and covariance: the class-conditioned full Gaussian was
    the unconditional one on the digits). One unseen: the pooled (unconditional) fit."""
    from pgraft_cli.models.corrector import fit_gaussian, fit_gaussian_by_class

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 40 + [1] * 3)
    noises = torch.randn(43, 1, 2, 2, generator=g) + labels.view(-1, 1, 1, 1) * 3.0  # 4 dimensions
    mean, chol, chol_of = fit_gaussian_by_class(noises, labels, 3)
    own, pooled = fit_gaussian(noises[labels == 0]), fit_gaussian(noises)
    torch.testing.assert_close((mean[0], chol[chol_of[0]]), own)
    torch.testing.assert_close((mean[2], chol[chol_of[2]]), pooled)
    flat = noises.reshape(43, 4).double()
    centred = torch.cat([flat[labels == c] - flat[labels == c].mean(0) for c in (0, 1)])
    within = centred.T @ centred / (43 - 2) + 1e-5 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(mean[1], flat[labels == 1].mean(0))
    torch.testing.assert_close(chol[chol_of[1]] @ chol[chol_of[1]].T, within)
    # the tied spread leaves out the 3.0 between the class means, which the pooled one holds
    assert float(within.trace()) < 0.8 * float((pooled[1] @ pooled[1].T).trace())


def test_the_pooled_cholesky_factor_is_stored_once_not_per_class(tmp_path):
    """1000 classes sharing the pooled fit hold one D x D factor (DiT's 1000 x 4096^2 was ~134 GB), and
    each row still maps with its class's factor, also after a save and load."""
    from pgraft_cli.models.corrector import fit_gaussian_by_class

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([5] * 30 + [7] * 3)
    noises = torch.randn(33, 1, 2, 2, generator=g) + labels.view(-1, 1, 1, 1)
    mean, chol, chol_of = fit_gaussian_by_class(noises, labels, 1000)
    assert chol.shape == (3, 4, 4) and chol_of.shape == (1000,)  # pooled, tied (class 7), class 5's own
    assert (chol_of[7], chol_of[5]) == (1, 2) and int((chol_of == 0).sum()) == 998
    corrector = NoiseCorrector("gaussian", 4, 0, mean=mean.float(), chol=chol.float(), chol_of=chol_of,
                               conditioning="class")
    e = torch.randn(3, 1, 2, 2, generator=g)
    z = corrector(e, torch.tensor([5, 7, 5]))
    for row, c in enumerate((5, 7, 5)):
        want = mean[c].float() + chol[chol_of[c]].float() @ e[row].reshape(-1)
        torch.testing.assert_close(z[row].reshape(-1), want)
    # through the file: the shared factor stays one row (a 10-class model of 256 dimensions)
    chol = torch.stack([torch.eye(256) * 0.5, torch.eye(256) * 2.0])
    corrector = NoiseCorrector("gaussian", 4, mean=torch.zeros(10, 256), chol=chol,
                               chol_of=torch.tensor([0, 0, 1] + [0] * 7), conditioning="class")
    back = load_model(str(save_corrected(tmp_path / "c.safetensors", corrector, load_model(str(_class_flow(tmp_path))),
                                         {}, {}))).corrector
    assert back.chol.shape == (2, 256, 256)
    e = torch.randn(2, 1, 16, 16, generator=g)
    torch.testing.assert_close(back(e, torch.tensor([2, 0])), torch.stack([e[0] * 2.0, e[1] * 0.5]))


def test_a_class_conditioned_flow_corrector_trains_with_a_class_embedding_and_round_trips(tmp_path):
    """The flow corrector of a class model: UNet2DModel with ``num_class_embeds``; each row follows its class."""
    from pgraft_cli.io.recipes import load_recipe
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.report.ui import progress
    from pgraft_cli.stages.correct import run_train_corrector

    rec = load_recipe("inverse-noise", ["correct.corrector_train_steps=2", "correct.corrector_batch_size=4",
                                        "correct.corrector_channels=[8, 16]", "correct.corrector_sample_steps=2"])
    labels = torch.tensor([0, 1, 2] * 4)
    noises = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(1)) + labels.view(-1, 1, 1, 1)
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        corrector, info = run_train_corrector(noises, (1, 16, 16), rec.correct, "base", store, bar,
                                              conds={"conditioning": "class", "condition": labels, "num_classes": 3})
    assert info["conditioning"] == "class" and corrector.model_config["num_class_embeds"] == 3
    e = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    a, b = corrector(e, torch.tensor([0, 0])), corrector(e, torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])
    assert float((a[1] - b[1]).abs().max()) > 0
    model = load_model(str(_class_flow(tmp_path)))
    back = load_model(str(save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {}))).corrector
    torch.testing.assert_close(back(e, torch.tensor([0, 2])), b)


def test_export_refuses_a_conditioned_corrector_in_one_line(tmp_path):
    model = load_model(str(_class_flow(tmp_path)))
    corrector = NoiseCorrector("gaussian-diag", 4, mean=torch.zeros(10, 256), std=torch.ones(10, 256),
                               conditioning="class")
    path = save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {})
    proc = cli_run("export", path, "--out", tmp_path / "pipe")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "class" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "pipe").exists()


def test_text_gaussian_corrector_regresses_the_mean_on_the_pooled_embedding():
    """Noises whose mean is a linear map of the embedding: the fit recovers it, predicts an unseen
    embedding, and its leave-one-out gain over the pooled mean is near 1; unrelated noises gain nothing."""
    from pgraft_cli.models.corrector import fit_gaussian_on_text

    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(60, 4, generator=g, dtype=torch.float64)
    true = torch.randn(4, 32, generator=g, dtype=torch.float64) * 3
    noises = (embeds @ true + 0.1 * torch.randn(60, 32, generator=g, dtype=torch.float64)).view(60, 2, 4, 4)
    mean, weight, std, info = fit_gaussian_on_text(noises, embeds, "gaussian-diag")
    unseen = torch.randn(1, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mean + unseen @ weight, unseen @ true, atol=0.1, rtol=0)
    assert info["loo_gain"] > 0.99 and float((std - 0.1).abs().max()) < 0.05
    _, _, _, none = fit_gaussian_on_text(torch.randn(60, 32, generator=g), embeds, "gaussian")
    assert none["loo_gain"] < 0.05


def test_each_text_family_gives_its_pooled_embedding(tiny_sd_dir, tiny_sdxl_dir, tiny_sd3_dir):
    """SD: the CLIP text encoder's pooler_output; SDXL, SD3: the pooled embedding their network reads."""
    prompts = ["a cat", "a dog"]
    sd = load_model(str(tiny_sd_dir))
    tok = sd.pipeline.tokenizer(prompts, padding="max_length", max_length=sd.pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(sd.pooled_text(prompts), sd.pipeline.text_encoder(tok.input_ids).pooler_output)
    for folder in (tiny_sdxl_dir, tiny_sd3_dir):
        model = load_model(str(folder))
        want = model.encode(prompts, None, 1.0).pooled
        torch.testing.assert_close(model.pooled_text(prompts), want.float())
        assert float((want[0] - want[1]).abs().max()) > 0


def test_a_text_conditioned_flow_corrector_trains_on_embeddings_and_round_trips(tmp_path, tiny_sd_dir):
    """The flow corrector of a text model: UNet2DModel with ``class_embed_type = "identity"`` fed a
    learned projection of the pooled embedding; saved and loaded with the projection."""
    from pgraft_cli.io.recipes import load_recipe
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.report.ui import progress
    from pgraft_cli.stages.correct import corrector_conditions, run_train_corrector

    model = load_model(str(tiny_sd_dir))
    rec = load_recipe("inverse-noise", ["correct.corrector_train_steps=2", "correct.corrector_batch_size=4",
                                        "correct.corrector_channels=[8, 16]", "correct.corrector_sample_steps=2"])
    captions = ["a cat", "a dog", "a tree"] * 2
    conds = corrector_conditions(model, None, captions, 4)
    assert conds["condition"].shape == (6, model.pipeline.text_encoder.config.hidden_size)
    noises = torch.randn(6, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    with RunStore(tmp_path / "run") as store, progress(False) as bar:
        corrector, info = run_train_corrector(noises, model.sample_shape, rec.correct, "base", store, bar, conds=conds)
    assert info["conditioning"] == "text" and corrector.model_config["class_embed_type"] == "identity"
    e = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(2))
    a = corrector(e, corrector.condition_of(["a cat", "a cat"], None, model.pooled_text))
    b = corrector(e, corrector.condition_of(["a cat", "never seen"], None, model.pooled_text))
    torch.testing.assert_close(a[0], b[0])
    assert float((a[1] - b[1]).abs().max()) > 0
    back = load_model(str(save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {})))
    cond = back.corrector.condition_of(["a cat", "never seen"], None, back.pooled_text)
    torch.testing.assert_close(back.corrector(e, cond), b)


def test_a_corrected_file_records_its_inversion_guidance_and_refuses_another(tmp_path):
    """A corrector is fitted to the base sampler at one guidance scale (and autocast): the file records
    both, and sampling the conditioned model at another scale ends in one error line; a corrector
    with no recorded guidance (an unconditional base) takes any."""
    from pgraft_cli.io.checkpoints import save_pgraft_safetensors
    from pgraft_cli.pipelines.skeleton import corrector_steps

    plain = load_model(str(_class_flow(tmp_path)))  # guided: its last class is the null class
    model = load_model(str(save_pgraft_safetensors(tmp_path / "guided.safetensors", plain.network, plain.model_class,
                                                   plain.model_config, plain.scheduler_config, {},
                                                   extra={"pgraft.null_class": "9"})))
    assert model.guided
    corrector = NoiseCorrector("gaussian-diag", 4, mean=torch.zeros(10, 256), std=torch.ones(10, 256),
                               conditioning="class", guidance_scale=3.0, autocast="torch.bfloat16")
    path = save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {})
    back = load_model(str(path))
    assert (back.corrector.guidance_scale, back.corrector.autocast) == (3.0, "torch.bfloat16")
    assert corrector_steps(back, None, "sample", 3.0) == 4
    with pytest.raises(PgraftError, match="guidance scale 3, not 5"):
        corrector_steps(back, None, "sample", 5.0)
    result = runner.invoke(app, ["sample", str(path), "--num", "1", "--class", "1", "--guidance-scale", "5",
                                 "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, PgraftError) and "guidance scale 3, not 5" in str(result.exception)
    assert "\n" not in str(result.exception) and not (tmp_path / "run").exists()  # refused before any work
    back.corrector.guidance_scale = None  # as an unconditional base's corrector records it
    assert corrector_steps(back, None, "sample", 5.0) == 4


@pytest.mark.slow
def test_a_flux_dev_corrector_is_fitted_at_the_distilled_guidance_it_samples_with(tmp_path, tiny_flux_dir):
    """Flux dev reads sample.distilled_guidance, not the classifier-free scale: the inversion ran at the
    built-in 3.5 whatever was set, the file recorded sample.guidance_scale, and sampling at another distilled
    guidance went through unchecked while --guidance-scale (unused by Flux) was refused."""
    from PIL import Image
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i:02d}.png")
    (folder / "captions.txt").write_text("\n".join(["a red square", "a tree"] * 3) + "\n")
    args = ["correct", str(tiny_flux_dir), "--data", str(folder), "--json", "--features", "none",
            "--set", "correct.base_steps=2", "--set", "correct.num_images=6", "--set", "correct.inversion_iterations=6",
            "--set", "correct.invert_shard_size=6", "--set", "correct.corrector=gaussian-diag", "--set", "evaluate.num=2",
            "--set", "sample.batch_size=2", "--set", "correct.max_reconstruction_rms=10.0",
            "--set", "correct.max_dropped_fraction=0.9"]
    noises = {}
    for dg in (1.0, 8.0):
        result = runner.invoke(app, [*args, "--set", f"sample.distilled_guidance={dg}", "--run-dir", str(tmp_path / f"r{dg}"),
                                     "--out", str(tmp_path / f"c{dg}.safetensors")])
        assert result.exit_code == 0, result.output
        noises[dg] = load_file(str(tmp_path / f"r{dg}" / "invert" / "shard-00000.safetensors"))["noise"]
        assert json.loads((tmp_path / f"r{dg}" / "evaluate-corrected" / "settings.json").read_text())[
            "distilled_guidance"] == dg
        assert load_model(str(tmp_path / f"c{dg}.safetensors")).corrector.guidance_scale == dg
    assert float((noises[1.0] - noises[8.0]).abs().max()) > 1e-4
    path = str(tmp_path / "c8.0.safetensors")
    common = ["sample", path, "--num", "1", "--prompt", "a tree", "--json"]
    wrong = runner.invoke(app, [*common, "--set", "sample.distilled_guidance=1", "--run-dir", str(tmp_path / "s1")])
    assert isinstance(wrong.exception, PgraftError)
    assert "distilled guidance 8, not 1; pass --set sample.distilled_guidance=8" in str(wrong.exception)
    right = runner.invoke(app, [*common, "--set", "sample.distilled_guidance=8", "--guidance-scale", "1",
                                "--run-dir", str(tmp_path / "s8")])
    assert right.exit_code == 0, right.output
    # a file written before the record named its guidance holds sample.guidance_scale (5), unread by Flux: it
    # was inverted at the built-in 3.5, which is what it is now read as
    state, meta = load_file(path), dict(safe_open(path, "pt").metadata())
    fitted = json.loads(meta["pgraft.corrector_inversion"])
    assert fitted["guidance"] == "distilled"
    old = tmp_path / "old.safetensors"
    meta["pgraft.corrector_inversion"] = json.dumps({**{k: v for k, v in fitted.items() if k != "guidance"},
                                                     "guidance_scale": 5.0})
    save_file(state, str(old), metadata=meta)
    assert load_model(str(old)).corrector.guidance_scale == 3.5

    # Flux schnell reads no guidance: nothing recorded, any distilled guidance samples, the export's default call runs
    from conftest import build_tiny_flux_pipeline

    schnell = build_tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    made = runner.invoke(app, [args[0], str(schnell), *args[2:], "--run-dir", str(tmp_path / "rs"),
                               "--out", str(tmp_path / "cs.safetensors")])
    assert made.exit_code == 0, made.output
    assert load_model(str(tmp_path / "cs.safetensors")).corrector.guidance_scale is None
    other = runner.invoke(app, ["sample", str(tmp_path / "cs.safetensors"), "--num", "1", "--prompt", "a tree",
                                "--set", "sample.distilled_guidance=1", "--run-dir", str(tmp_path / "ss")])
    assert other.exit_code == 0, other.output


def test_flops_of_a_text_corrector_count_its_mean_and_its_pooled_text_pass(tmp_path, tiny_sd_dir):
    """The report left out the text encoders' second pass (the corrector's input) and a text Gaussian's mean
    c W (2 E D): it counted 2 D^2 for the spread alone."""
    from pgraft_cli.core.metrics import measure_flops
    from pgraft_cli.stages.evaluate import flops_per_image

    model = load_model(str(tiny_sd_dir))
    dim = math.prod(model.sample_shape)
    width = model.pooled_text([""]).shape[1]
    torch.manual_seed(0)
    corrector = NoiseCorrector("gaussian", 4, 0, mean=torch.zeros(dim), chol=torch.eye(dim), conditioning="text",
                               weight=torch.randn(width, dim))
    loaded = load_model(str(save_corrected(tmp_path / "c.safetensors", corrector, model, {}, {})))
    parts = flops_per_image(loaded, 4)["flops_parts"]
    assert parts["corrector"] == 2 * dim * dim + 2 * width * dim
    pooled = measure_flops(lambda: loaded.pooled_text([""]))
    assert parts["corrector_condition"] == pooled > 0
