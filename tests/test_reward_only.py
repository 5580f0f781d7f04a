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


def test_best_of_groups_must_all_hold_n_images(tmp_path, unet_pipeline_dir):
    """``--best-of 4 --num 20`` on a 10-class model gave ten groups of 2 (image i has class i mod 10) and printed
    "best of 2"; ``--num 48`` mixed groups of 4 and of 1 into one mean. Unequal groups are refused before any
    sampling now, naming the multiple to pass; the groups of ``--num 40`` hold 4 images each."""
    from types import SimpleNamespace

    from conftest import cli_run

    from pgraft_cli.stages.evaluate import check_best_of_groups, image_groups
    from pgraft_cli.stages.sample import Conditions

    model, cond = SimpleNamespace(conditioning="class", num_classes=10), Conditions()
    for num in (20, 48):
        with pytest.raises(PgraftError, match="multiple of 40"):
            check_best_of_groups(model, cond, num, 4)
    check_best_of_groups(model, cond, 40, 4)
    assert torch.bincount(image_groups(model, cond, torch.arange(40), 4)).tolist() == [4] * 10
    check_best_of_groups(model, Conditions(class_label=3), 8, 4)  # one class: runs of 4
    text = SimpleNamespace(conditioning="text", num_classes=None)
    check_best_of_groups(text, Conditions(prompts=["a", "b", "c"]), 12, 4)
    classes = unet_pipeline_dir("ddpm", num_class_embeds=10)
    proc = cli_run("evaluate", classes, "--reward", "classifier:digits:3", "--best-of", "4", "--num", "20",
                   "--steps", "1", "--run-dir", tmp_path / "run")
    assert proc.returncode == 2 and "multiple of 40" in proc.stderr and not (tmp_path / "run" / "sample").exists()


def test_best_of_is_not_reported_over_prompts_of_unequal_counts(tiny_sd_dir, tmp_path):
    """Without --best-of a text model's prompts are the groups: 5 images of 3 prompts made groups of 2 and 1, and
    the mean of their maxima was reported as "best of 1". It is left out now, with a warning saying why."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\na cat\n")
    result = runner.invoke(app, ["evaluate", str(tiny_sd_dir), "--prompts", str(prompts), "--reward",
                                 "jpeg-incompressibility", "--num", "5", "--steps", "1", "--run-dir",
                                 str(tmp_path / "run"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert "reward_best_of_mean" not in summary and summary["reward_mean"] is not None
    assert any("groups of 1 to 2" in w for w in summary["warnings"])


def test_a_best_of_gate_is_refused_up_front_where_the_run_has_no_groups(tiny_sd_dir, tmp_path):
    """``--fail-if reward_best_of_mean...`` on a run without prompts or --best-of sampled for half a minute and then
    failed with "this run has no metric"; so did one whose prompts do not divide --num (groups of unequal
    size, which report no best-of). Both are refused before any work now."""
    from conftest import cli_run

    proc = cli_run("evaluate", "digits", "--reward", "classifier:digits:3", "--fail-if", "reward_best_of_mean<-100")
    assert proc.returncode == 2 and "reward_best_of_mean" in proc.stderr and "--best-of" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\na cat\n")
    uneven = cli_run("evaluate", tiny_sd_dir, "--prompts", prompts, "--reward", "jpeg-incompressibility", "--num", "5",
                     "--steps", "1", "--fail-if", "reward_best_of_mean<-100", "--run-dir", tmp_path / "run")
    assert uneven.returncode == 2 and "reward_best_of_mean" in uneven.stderr and not (tmp_path / "run").exists()
    from pgraft_cli.report.gates import gate_names

    assert "reward_best_of_mean" in gate_names("evaluate", grouped=True)
    assert "base.reward_best_of_mean" not in gate_names("finetune", grouped=False)


def test_score_and_filter_report_the_same_std():
    """``pgraft score`` printed the sample std of the rewards (n - 1) and ``pgraft filter`` the population std (n) of
    the same rewards: 6.88 against 6.44 on 8 samples. Both are the population std now, as best-of's is."""
    from pgraft_cli.core.selection import summarize
    from pgraft_cli.stages.score import reward_stats

    r = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    assert reward_stats(r)["reward_std"] == pytest.approx(float(r.std(correction=0)))
    shown = summarize(r, torch.ones(8, dtype=torch.bool), "threshold", {"threshold": 0.0})
    assert shown.reward_before["std"] == pytest.approx(reward_stats(r)["reward_std"])
