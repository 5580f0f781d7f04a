"""The data-copying test `pgraft correct` runs on its base and corrected samples (Meehan, Chaudhuri and
Dasgupta 2020, global form): the maths against closed forms and scipy, the stage on real digits, the
report, the gates and the run's notes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.core.metrics import (FidKid, cell_copy_stat, copy_cells, copy_stats, copy_test, kmeans, mann_whitney,
                                    nearest_distances, rms_spread)
from pgraft_cli.errors import PgraftError
from pgraft_cli.io.data import load_data
from pgraft_cli.report.gates import gate_names, parse_gates
from pgraft_cli.stages.evaluate import classifier_features, copy_reference, copying
from pgraft_cli.stages.sample import to_uint8

runner = CliRunner()


def test_mann_whitney_counts_pairs_with_ties_a_half_and_agrees_with_scipy():
    from scipy import stats

    a, b = torch.tensor([1.0, 2, 2, 3]), torch.tensor([2.0, 2, 0])
    # pairs a_i > b_j: 1 > 0; 2 > 0 twice; 3 > all three = 6; ties 2 = 2 four times: U = 6 + 2 = 8;
    # N = 7 with one tied group of 4 (the 2s): sigma^2 = 12 / 12 (8 - (64 - 4) / 42)
    z, auc = mann_whitney(a, b)
    assert auc == pytest.approx(8 / 12) and z == pytest.approx((8 - 6) / math.sqrt(8 - 60 / 42))
    r = stats.mannwhitneyu(a.numpy(), b.numpy(), alternative="two-sided", method="asymptotic", use_continuity=False)
    assert abs(z) == pytest.approx(stats.norm.isf(r.pvalue / 2), rel=1e-6) and r.statistic == 8
    assert mann_whitney(torch.ones(3), torch.ones(4)) == (0.0, 0.5)  # every value tied: no variance, no evidence
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.3
    z, auc = mann_whitney(a, b)
    p = stats.mannwhitneyu(a.double().numpy(), b.double().numpy(), alternative="two-sided", method="asymptotic",
                           use_continuity=False).pvalue
    assert z < 0 and abs(z) == pytest.approx(stats.norm.isf(p / 2), rel=1e-6)
    assert auc == pytest.approx(float((a[:, None] > b[None, :]).double().mean()), rel=1e-12)
    assert mann_whitney(b, b) == pytest.approx((0.0, 0.5), abs=1e-12)  # a set against itself: U = m n / 2
    with pytest.raises(PgraftError, match="needs values on both sides"):
        mann_whitney(a, torch.zeros(0))


def test_nearest_distances_are_the_brute_force_minimum_and_exactly_zero_for_a_training_row():
    g = torch.Generator().manual_seed(1)
    support, queries = torch.randn(50, 7, generator=g), torch.randn(20, 7, generator=g)
    brute = torch.tensor([min(float((q - r).norm()) for r in support) for q in queries], dtype=torch.float64)
    assert torch.allclose(nearest_distances(queries, support, chunk=6), brute, rtol=1e-6)
    # far from the origin the product form's rounding is large; the recomputed distance is still 0, and
    # still the nearest among rows that differ by less than float32 rounds at that scale
    far = support.double() * 1000 + 5000
    assert torch.equal(nearest_distances(far[:7], far), torch.zeros(7, dtype=torch.float64))
    close = torch.cat([far, far[:7] + 1e-3])  # a second row 1e-3 from each of the first 7 (|x| ~ 1e4)
    assert torch.equal(nearest_distances(far[:7], close), torch.zeros(7, dtype=torch.float64))
    assert torch.allclose(nearest_distances(far[:7] + 4e-4, close), torch.full((7,), 4e-4 * math.sqrt(7), dtype=torch.float64))


def test_copy_stats_flag_a_copier_and_not_a_set_drawn_like_the_held_out_one():
    g = torch.Generator().manual_seed(2)
    train, heldout, fresh = (torch.randn(n, 5, generator=g) for n in (400, 300, 300))
    unseen = copy_test(fresh, train, heldout)
    assert abs(unseen["z"]) < 3 and 0.4 < unseen["auc"] < 0.6 and unseen["min"] > 0 and abs(unseen["near_z"]) < 3
    copier = copy_test(torch.cat([train[:150], fresh[:150]]), train, heldout)  # half of it training rows
    # its copies are below every held-out distance, so AUC = half the unseen half's own AUC against the held-out
    half = copy_test(fresh[:150], train, heldout)["auc"]
    assert copier["auc"] == pytest.approx(half / 2) and copier["z"] < -7 and copier["min"] == 0.0 and copier["near"] >= 0.5
    few = copy_test(torch.cat([train[:6], fresh[6:]]), train, heldout)  # 2 %: Z barely moves, the minimum shows it
    assert few["min"] == 0.0 and few["z"] > -3
    assert copier["near_z"] > 10
    d = torch.arange(1.0, 101.0)  # the near share is below the held-out 5 % quantile (5.95 by linear interpolation)
    stats = copy_stats(d - 5.0, d)
    null = (99 * 0.05 + 1) / 101  # a draw like the held-out ones falls below their interpolated quantile this often
    se = math.sqrt(null * (1 - null) * 2 / 100)
    assert stats["near"] == pytest.approx(0.10) and stats["near_null"] == pytest.approx(null)
    assert stats["near_null_se"] == pytest.approx(se) and stats["near_z"] == pytest.approx((0.10 - null) / se)
    with pytest.raises(PgraftError, match="at least 2 samples and 2 held-out"):
        copy_stats(d[:1], d)


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([m + 0.1 * torch.randn(40, 2, generator=g, dtype=torch.float64) for m in means])
    centres = kmeans(x, 3, seed=1)
    found = sorted(centres.tolist())
    expected = sorted(x.view(3, 40, 2).mean(1).tolist())  # Lloyd's fixed point: each blob's own mean
    assert torch.allclose(torch.tensor(found), torch.tensor(expected), atol=1e-12)
    assert torch.equal(kmeans(x, 3, seed=1), centres)


def test_the_cell_statistic_weights_each_cells_z_by_its_held_out_share_and_flags_one_copying_cell():
    """Three separated regions, one with too few held-out rows to count: C_T is the held-out-weighted mean of
    the other two cells' Z (by the closed form from ``mann_whitney``), the p corrected for those two; samples
    that copy one region read there (p tiny) while C_T stays above 0."""
    g = torch.Generator().manual_seed(4)

    def blob(n, at):
        return torch.randn(n, 3, generator=g, dtype=torch.float64) + at

    far, third = torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 50.0, 0.0], dtype=torch.float64)
    train = torch.cat([blob(200, 0), blob(200, far), blob(100, third)])
    heldout = torch.cat([blob(60, 0), blob(20, far), blob(4, third)])  # the third cell: too few held-out rows
    samples = torch.cat([blob(150, 0) * 1.5, train[200:300], blob(30, third)])  # region 0 spread; region 1 copies
    centres = kmeans(train, 3)
    cells = cell_copy_stat(samples, train, heldout, centres, min_samples=20)
    assert cells["cells"] == 3 and cells["cells_used"] == 2 and cells["heldout_share_used"] == pytest.approx(80 / 84)
    zs = {}
    for name, at, n_q in (("near", 0, 60), ("far", 200, 20)):
        t = train[at:at + 200]
        s = samples[:150] if name == "near" else samples[150:250]
        q = heldout[:60] if name == "near" else heldout[60:80]
        zs[name] = mann_whitney(nearest_distances(s, t), nearest_distances(q, t))[0]
    assert cells["c_t"] == pytest.approx((60 * zs["near"] + 20 * zs["far"]) / 80)  # over the cells used
    assert cells["z_min"] == pytest.approx(zs["far"]) and zs["far"] < -5 and zs["near"] > 0 and cells["c_t"] > 0
    # one-sided, lower tail, times the 2 cells used (not the 3 fitted)
    assert cells["p_min"] == pytest.approx(2 * 0.5 * math.erfc(-zs["far"] / math.sqrt(2))) and cells["p_min"] < 1e-6
    assert cell_copy_stat(samples, train, heldout, centres, min_samples=20, min_heldout=4)["cells_used"] == 3
    assert copy_cells(360, 1000) == 18 and copy_cells(360, 400) == 10 and copy_cells(5000, 5000) == 50
    assert copy_cells(360, 16) == 1
    few = cell_copy_stat(samples[:20], train, heldout, centres, min_samples=20)  # no cell has more than 20 samples
    assert few["c_t"] is None and few["p_min"] is None and few["cells_used"] == 0


def _reference(rows: torch.Tensor) -> FidKid:
    ref = FidKid(rows.shape[1], kid_subsets=2)
    ref.update(rows, real=True)
    return ref


def test_the_stage_on_real_digits_passes_unseen_digits_flags_copies_and_warns_on_a_leaky_reference():
    """In the bundled classifier's features (FID's): the judge split (unseen digits) reads as unseen, the
    training digits themselves as copies; held-out images that are training images draw a warning."""
    feats = classifier_features()
    train, test, judge = (feats(load_data(f"digits-{s}", (1, 16, 16)).float()) for s in ("train", "test", "judge"))
    ref, why = copy_reference(_reference(test), _reference(train), "digits-train", 1000)
    assert why is None and ref.name == "digits-train" and len(ref.heldout) == len(test)
    unseen = copying(judge, ref)
    assert abs(unseen["copy_z"]) < 3 and abs(unseen["copy_auc"] - 0.5) < 0.06 and abs(unseen["copy_near_z"]) < 3
    assert unseen["warnings"] == [] and unseen["copying"]["num_train"] == len(train)
    # copies as a sampler stores them: 8 bits a pixel, so not on the digits' own grid
    digits = load_data("digits-train", (1, 16, 16)).float()
    stored = feats(to_uint8(digits[:300]).permute(0, 3, 1, 2) / 255.0)
    copies = copying(stored, ref)
    assert copies["copy_z"] < -10 and copies["copy_auc"] < 0.01 and copies["copy_near"] == 1.0
    assert 0 < copies["copying"]["min"] < 0.1 * ref.heldout.min()
    # training digits whose features were computed elsewhere (other batches: about 1e-6 apart; TF32: about
    # 1e-3 of the spread): a perturbation of 3e-3 of the spread, whatever this host's kernels do
    noise = torch.randn(70, train.shape[1], generator=torch.Generator().manual_seed(0))
    again = train[:70] + 3e-3 * rms_spread(train) * noise / noise.norm(dim=1, keepdim=True)
    leaky, why = copy_reference(_reference(torch.cat([again, test])), _reference(train), "digits-train", 1000)
    assert why is None and len(leaky.heldout) == len(test) and torch.equal(leaky.heldout, ref.heldout)
    warned = copying(judge, leaky)["warnings"]
    assert warned == ["70 of the 430 held-out images are also in digits-train: the copy test leaves them out of its "
                      "reference; pass --eval-data with images outside the training data"]
    none, why = copy_reference(_reference(torch.cat([again, test[:60]])), _reference(train), "digits-train", 1000)
    assert none is None and why.startswith("copy test skipped: 70 of the 130 held-out images are digits-train images too")
    no_rows = FidKid.from_reference_state({**_reference(train).reference_state(), "features": torch.zeros(0, 64).numpy()})
    ref, why = copy_reference(_reference(test), no_rows, "digits-train", 1000)
    assert ref is None and why.startswith("copy test skipped: the reference statistics of digits-train hold no feature rows")


def test_copy_gates_exist_for_correct_only():
    assert {"copy_z", "copy_auc", "copy_near", "copy_near_z", "base.copy_z", "base.copy_near_z"} <= gate_names("correct")
    for verb in ("finetune", "evaluate"):
        assert "copy_z" not in gate_names(verb)
    with pytest.raises(PgraftError, match="measures no 'copy_z'"):
        parse_gates(["copy_z<-3"], gate_names("evaluate"))


def test_the_copy_test_is_skipped_without_held_out_images_drawn_like_the_samples(tmp_path):
    """No held-out images (FID against --data, or a stats file of it) or a conditioned model: a note says why."""
    from pgraft_cli.io.refstats import save_stats
    from pgraft_cli.pipelines.correct import copy_skipped

    assert copy_skipped("none", "digits-test", "digits-train") is None
    assert copy_skipped("none", "digits-train", "digits-train").startswith("copy test skipped: FID's reference is the training data")
    state = _reference(torch.randn(8, 4)).reference_state()
    for data, skipped in (("digits-train", True), ("digits-test", False)):
        path = save_stats(tmp_path / f"{data}.npz", state, {"features": "f", "image_shape": [1, 16, 16], "data": data})
        assert (copy_skipped("none", str(path), "digits-train") is not None) == skipped
    for kind, what in (("class", "classes in turn"), ("text", "captions")):
        assert f"{kind}-conditioned model is sampled on --data's {what}" in copy_skipped(kind, "digits-test", "digits-train")


SMALL = ["--set", "correct.base_steps=4", "--set", "correct.num_images=16", "--set", "correct.inversion_iterations=8",
         "--set", "correct.max_reconstruction_rms=0.05", "--set", "correct.corrector_train_steps=5", "--set",
         "correct.corrector_batch_size=16", "--set", "correct.corrector_sample_steps=2", "--set", "evaluate.num=16",
         "--set", "evaluate.kid_subsets=2"]


def test_correct_tests_both_samplers_for_copying_gates_on_it_and_reports_it(tmp_path):
    """The digits' default: fitted on digits-train, FID against held-out digits-test, so both samplers get the
    copy test (in the JSON, the table, the lines, report.html and the gates); with --data alone there is no
    held-out set and a note says so."""
    r = runner.invoke(app, ["correct", "digits", "--run-dir", str(tmp_path / "run"), "--json", *SMALL,
                            "--fail-if", "copy_z>-1000", "--fail-if", "base.copy_near<0"])
    assert r.exit_code == 1, r.output  # the first gate holds for any Z: it proves the gate reads the metric
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("base", "corrected"):
        c = s[key]["copying"]
        assert c["train"] == "digits-train" and c["num"] == 16 and c["num_heldout"] == 360 and c["num_train"] == 1078
        assert s[key]["copy_z"] == c["z"] and s[key]["copy_auc"] == c["auc"] and s[key]["copy_near"] == c["near"]
        assert s[key]["copy_near_z"] == c["near_z"] and c["min"] > 0 and not s[key]["notes"]
        assert c["cells"]["cells"] == 1 and s[key]["copy_ct"] is None and s[key]["copy_cell_p"] is None  # 16 samples
        assert not any("held-out" in w for w in s[key]["warnings"])
    failed = [line for line in r.output.splitlines() if line.startswith("gate failed")]
    assert failed == [f"gate failed: copy_z>-1000 (copy_z = {s['corrected']['copy_z']:.6g})"]
    shown = runner.invoke(app, ["correct", "digits", "--run-dir", str(tmp_path / "run"), *SMALL])
    assert shown.exit_code == 0, shown.output
    b, c = s["base"]["copying"], s["corrected"]["copying"]
    assert "copy AUC" in shown.output
    assert f"AUC base {b['auc']:.3f} (Z {b['z']:+.1f}), corrected {c['auc']:.3f} (Z {c['z']:+.1f})" in shown.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert '<table id="copying">' in html and f"<td>{c['z']:+.2f}</td>" in html
    assert ("1 k-means cells of the digits-train images: none has more than 20 of the 16 samples and 5 held-out "
            "images, so C_T and the lowest cell's p were not measured (raise evaluate.num)") in shown.output
    assert (f"below the held-out 5th percentile: base {b['near']:.1%}, corrected {c['near']:.1%} "
            f"({c['near_null']:.1%} +- {c['near_null_se']:.1%} for samples drawn like the held-out images)") in shown.output

    alone = runner.invoke(app, ["correct", "digits", "--data", "digits-train", "--run-dir", str(tmp_path / "alone"),
                                "--json", *SMALL, "--fail-if", "copy_z<-3"])
    assert alone.exit_code == 1 and "gate failed: copy_z<-3 (copy_z was not measured in this run)" in alone.output
    a = json.loads(alone.stdout.strip().splitlines()[-1])
    assert a["fid_data"] == "digits-train" and a["corrected"]["copying"] is None and a["corrected"]["copy_z"] is None
    assert a["corrected"]["notes"] == ["copy test skipped: FID's reference is the training data (digits-train); pass "
                                       "--eval-data with held-out images to test whether the samples copy it"]


def test_the_report_renders_a_copy_test_recorded_without_its_expectation():
    """A summary written before the share's expectation was recorded renders with the nominal quantile."""
    from pgraft_cli.report.html import _copying_html

    old = {"z": 9.7, "auc": 0.672, "median": 1.7, "min": 0.5, "near": 0.039, "near_quantile": 0.05, "heldout_median": 1.3,
           "heldout_min": 0.45, "num": 1000, "num_heldout": 360, "num_train": 1078, "train": "digits-train"}
    html = _copying_html({"base": {"copying": old}, "corrected": {"copying": old, "features": "f"}, "fid_data": "digits-test"})
    assert "<td class=l>5.0% (drawn alike)</td>" in html and "<td>0.672</td>" in html
    assert _copying_html({"base": {}, "corrected": {}}) == ""


def test_evaluate_copy_test_false_turns_the_test_off_and_refuses_a_gate_on_it_before_any_work(tmp_path):
    """(The gate's one-line error: tests/test_errors.py.)"""
    off = ["--set", "evaluate.copy_test=false"]
    r = runner.invoke(app, ["correct", "digits", "--run-dir", str(tmp_path / "gated"), *SMALL, *off,
                            "--fail-if", "base.copy_near_z>3"])
    assert r.exit_code != 0 and not (tmp_path / "gated").exists()
    assert str(r.exception) == ("--fail-if base.copy_near_z>3 gates on the copy test, which evaluate.copy_test = false "
                                "turns off; drop the gate or the setting")
    r = runner.invoke(app, ["correct", "digits", "--run-dir", str(tmp_path / "run"), "--json", *SMALL, *off])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("base", "corrected"):
        assert s[key]["copying"] is None and s[key]["copy_z"] is None and s[key]["fid"] is not None
        assert s[key]["notes"] == ["copy test off (evaluate.copy_test = false)"]


def test_the_copy_test_switch_leaves_the_default_run_directory_where_it_was():
    """A report-only key: the same work resumes in the same folder whether the test is on or off, and the folder
    is the one the recipe named before the key existed."""
    from pgraft_cli.pipelines.skeleton import computed_recipe, default_run_dir, resolve_recipe

    on, off = (resolve_recipe("inverse-noise", [f"evaluate.copy_test={v}"]).to_dict() for v in ("true", "false"))
    assert on["evaluate"]["copy_test"] is True and off["evaluate"]["copy_test"] is False
    before = {s: ({k: v for k, v in vals.items() if k != "copy_test"} if s == "evaluate" else vals) for s, vals in on.items()}
    for recipe in (on, off):
        assert computed_recipe(recipe) == before
        assert default_run_dir("correct", {"recipe": computed_recipe(recipe)}) == default_run_dir("correct", {"recipe": before})
    changed = resolve_recipe("inverse-noise", ["evaluate.num=500"]).to_dict()
    assert default_run_dir("correct", {"recipe": computed_recipe(changed)}) != default_run_dir("correct", {"recipe": before})
