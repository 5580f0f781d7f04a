"""Reward-only evaluation (the paper's text-to-image protocol): no reference data, best-of-n per
prompt, FID skipped with one note; feature extractors from local transformers folders."""

import json

import pytest
import torch
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.core.metrics import best_of_n
from pgraft_cli.errors import PgraftError
from pgraft_cli.pipelines.evaluate import best_of_num
from pgraft_cli.stages.evaluate import fid_skipped, pick_features, pretrained_features
from pgraft_cli.stages.sample import load_images

runner = CliRunner()


def test_best_of_num_is_prompts_times_n_and_refuses_a_conflicting_num():
    assert best_of_num(4, None, ["a", "b", "c"], 2000) == 12
    assert best_of_num(None, 7, ["a"], 2000) == 7
    assert best_of_num(2, None, None, 10) == 10
    with pytest.raises(PgraftError, match="drop --num"):
        best_of_num(4, 10, ["a", "b", "c"], 2000)
    with pytest.raises(PgraftError, match="multiple"):
        best_of_num(3, None, None, 10)


def test_reward_only_evaluate_of_a_text_model(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\na cat\n")
    run = tmp_path / "run"
    result = runner.invoke(app, ["evaluate", str(tiny_sd_dir), "--prompts", str(prompts), "--reward",
                                 "jpeg-incompressibility", "--best-of", "2", "--steps", "2", "--run-dir", str(run),
                                 "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num"] == 6 and summary["fid"] is None and summary["features"] is None
    assert summary["notes"] == [fid_skipped("auto", has_data=False)]
    assert summary["nfe"] == 2 and summary["flops_per_image"] > 0 and summary["seconds_per_image"] > 0
    # the numbers are the reward of the stored images, grouped by prompt (image i has prompt i mod 3)
    from pgraft_cli.stages.rewards import jpeg_size_kb

    scores = jpeg_size_kb(load_images(run, "sample"))
    assert summary["reward_mean"] == pytest.approx(float(scores.mean()))
    best = best_of_n(scores, torch.arange(6) % 3)
    assert (summary["best_of"], summary["groups"]) == (2, 3)
    assert summary["reward_best_of_mean"] == pytest.approx(best["mean"])
    assert summary["reward_best_of_mean"] >= summary["reward_mean"]
    shown = runner.invoke(app, ["evaluate", str(tiny_sd_dir), "--prompts", str(prompts), "--reward",
                                "jpeg-incompressibility", "--best-of", "2", "--steps", "2", "--run-dir", str(run)])
    assert shown.exit_code == 0 and "note: FID skipped" in shown.output and "best of 2 over 3" in shown.output


def test_features_none_skips_fid_on_digits_with_one_note(tmp_path):
    result = runner.invoke(app, ["evaluate", "digits", "--features", "none", "--num", "8", "--steps", "2",
                                 "--run-dir", str(tmp_path / "run"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["fid"] is None and summary["notes"] == ["FID skipped: --features none"]


def test_an_unknown_feature_extractor_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["evaluate", "digits", "--features", "clip", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code != 0 and isinstance(result.exception, PgraftError)  # main() prints it as one line
    assert "clip:PATH" in str(result.exception) and not (tmp_path / "r").exists()


def test_auto_features_without_inception_weights_skip_fid_for_rgb_images(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cleanfid(name, *args, **kwargs):
        if name.startswith("cleanfid"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanfid)
    assert pick_features("auto", (3, 16, 16), None) is None
    with pytest.raises(PgraftError, match="inception-weights"):
        pick_features("inception", (3, 16, 16), None)


# ----------------------------------------------------------------------------------------------
# CLIP and DINOv2 features from tiny random local folders


@pytest.fixture(scope="module")
def clip_vision_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("clipv")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, fixture", [("clip", "clip_vision_dir"), ("dinov2", "dinov2_dir")])
def test_pretrained_features_are_the_models_pooled_output(name, fixture, request):
    from transformers import AutoImageProcessor, AutoModel

    from pgraft_cli.stages.rewards import _to_rgb_pil

    folder = request.getfixturevalue(fixture)
    feats = pick_features(f"{name}:{folder}", (1, 16, 16), None)
    assert feats.num_features == 16 and feats.name.startswith(f"{name}:sha256=")
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model, processor = AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        want = model(pixel_values=processor(images=_to_rgb_pil(images), return_tensors="pt")["pixel_values"]).pooler_output
    torch.testing.assert_close(feats(images), want.double(), atol=1e-6, rtol=0)


def test_a_folder_of_the_wrong_model_is_one_error(clip_vision_dir, tmp_path):
    with pytest.raises(PgraftError, match="Dinov2Model"):
        pretrained_features("dinov2", str(clip_vision_dir))
    with pytest.raises(PgraftError, match="no such folder"):
        pretrained_features("clip", str(tmp_path / "nope"))


def test_correct_with_features_none_skips_fid_with_one_note(tmp_path):
    result = runner.invoke(app, ["correct", "digits", "--features", "none", "--recipe", "inverse-noise",
                                 "--set", "correct.num_images=16", "--set", "correct.corrector=gaussian-diag",
                                 "--set", "correct.base_steps=2", "--set", "evaluate.num=8",
                                 "--run-dir", str(tmp_path / "run"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for side in ("base", "corrected"):
        assert summary[side]["fid"] is None and summary[side]["notes"] == ["FID skipped: --features none"]
