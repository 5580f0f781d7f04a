"""Reference statistics: ``pgraft stats`` files, ``--data ref.npz``, and the run/user caches."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.errors import PgraftError
from pgraft_cli.io.data import load_data
from pgraft_cli.io.refstats import FORMAT, is_stats_file, load_stats, user_cache_dir
from pgraft_cli.stages import evaluate as ev

runner = CliRunner()
# tests of the statistics cache: an empty user cache for each
pytestmark = pytest.mark.own_user_cache
EVAL = ["--num", "16", "--steps", "2", "--json", "--quiet"]
SMALL_CORRECT = ["--set", "correct.base_steps=4", "--set", "correct.num_images=16", "--set", "correct.inversion_iterations=8",
                 "--set", "correct.max_reconstruction_rms=0.05", "--set", "correct.corrector_train_steps=5", "--set",
                 "correct.corrector_batch_size=16", "--set", "correct.corrector_sample_steps=2", "--set", "evaluate.num=16",
                 "--set", "evaluate.kid_subsets=2"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def test_stats_file_holds_the_features_mean_covariance_and_rows(tmp_path):
    out = tmp_path / "ref.npz"
    summary = invoke("stats", "digits-test", "--features", "classifier", "--out", out, "--json")
    state, meta = load_stats(out)  # np.load(allow_pickle=False) inside
    feats = ev.classifier_features()(load_data("digits-test", (1, 16, 16))).numpy()
    assert meta["format"] == FORMAT and meta["features"] == ev.classifier_features().identity
    assert meta["image_shape"] == [1, 16, 16] and summary["num"] == len(feats) == int(state["n"])
    np.testing.assert_allclose(state["mu"], feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state["sigma"], np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(state["features"], feats.astype(np.float32))
    assert is_stats_file(str(out))
    with np.load(out, allow_pickle=False) as z:  # plain arrays: no object arrays anywhere
        assert all(z[k].dtype != object for k in z.files)


def test_data_from_a_stats_file_gives_the_same_metrics_as_the_images(tmp_path):
    out = tmp_path / "ref.npz"
    invoke("stats", "digits-test", "--features", "classifier", "--out", out, "--json")
    a = invoke("evaluate", "digits", "--data", "digits-test", "--features", "classifier", "--run-dir", tmp_path / "a", *EVAL)
    b = invoke("evaluate", "digits", "--data", out, "--features", "classifier", "--run-dir", tmp_path / "b", *EVAL)
    assert a["fid"] is not None
    assert (a["fid"], a["kid"], a["precision"], a["recall"]) == (b["fid"], b["kid"], b["precision"], b["recall"])


def test_a_stats_file_written_before_full_float32_features_is_used_with_a_note(tmp_path):
    """Files record their statistics version (3: features in full float32 on every device); an older file (no
    version) may hold a GPU's TF32 features, which the file cannot tell: its FID is the same, with a note."""
    from pgraft_cli.io.refstats import STATS_VERSION, save_stats

    new = tmp_path / "ref.npz"
    invoke("stats", "digits-test", "--features", "classifier", "--out", new, "--json")
    state, meta = load_stats(new)
    assert meta["version"] == STATS_VERSION == 3
    old = save_stats(tmp_path / "old.npz", state, {k: v for k, v in meta.items() if k not in ("version", "format")})
    a = invoke("evaluate", "digits", "--data", new, "--features", "classifier", "--run-dir", tmp_path / "a", *EVAL)
    b = invoke("evaluate", "digits", "--data", old, "--features", "classifier", "--run-dir", tmp_path / "b", *EVAL)
    assert a["fid"] == b["fid"] and not any("pgraft stats" in n for n in a["notes"])
    assert [n for n in b["notes"] if "earlier pgraft" in n] == [
        f"{old} was written by an earlier pgraft, before features were computed in full float32 on every device: if "
        f"it was written on a GPU its features are TF32 ones; write it again with pgraft stats"]
    # held out beside the training data, in correct: one note for the run, not one per sampler
    r = runner.invoke(app, ["correct", "digits", "--eval-data", str(old), "--features", "classifier", "--run-dir",
                            str(tmp_path / "c"), *SMALL_CORRECT])
    assert r.exit_code == 0, r.output
    assert " ".join(r.output.split()).count("was written by an earlier pgraft") == 1
    for version in ("3", 99, True, [3]):  # what an edited or a newer file may hold: a note, never a traceback
        odd = save_stats(tmp_path / "odd.npz", state, {**{k: v for k, v in meta.items() if k != "format"}, "version": version})
        c = invoke("evaluate", "digits", "--data", odd, "--features", "classifier", "--run-dir", tmp_path / f"o{version}", *EVAL)
        assert any(f"holds statistics of version {version!r}, not this pgraft's 3" in n for n in c["notes"])
    # pgraft stats does not re-stamp an old file as new
    again = runner.invoke(app, ["stats", str(old), "--shape", "1x16x16", "--out", str(tmp_path / "again.npz")])
    assert again.exit_code != 0 and not (tmp_path / "again.npz").exists()
    assert str(again.exception) == f"{old} is already a stats file; pass the images it was computed from"


def test_a_stats_file_of_other_features_is_one_error(tmp_path):
    out = tmp_path / "ref.npz"
    invoke("stats", "digits-test", "--features", "judge", "--out", out, "--json")
    result = runner.invoke(app, ["evaluate", "digits", "--data", str(out), "--features", "classifier",
                                 "--run-dir", str(tmp_path / "r"), *EVAL])
    assert isinstance(result.exception, PgraftError) and "pass matching --features" in str(result.exception)


def test_correct_refuses_statistics_for_the_images_it_inverts(tmp_path):
    out = tmp_path / "ref.npz"
    invoke("stats", "digits-test", "--features", "classifier", "--out", out, "--json")
    result = runner.invoke(app, ["correct", "digits", "--data", str(out), "--run-dir", str(tmp_path / "r")])
    assert isinstance(result.exception, PgraftError) and "not images" in str(result.exception)


def test_references_are_cached_in_the_run_and_user_cache_and_reused(tmp_path, monkeypatch):
    first = invoke("evaluate", "digits", "--data", "digits-test", "--features", "classifier",
                   "--run-dir", tmp_path / "a", *EVAL)
    assert len(list((tmp_path / "a" / "refstats").glob("*.npz"))) == 1
    assert len(list(user_cache_dir().glob("*.npz"))) == 1

    def no_images(*args, **kwargs):
        raise AssertionError("the reference was recomputed from images")

    monkeypatch.setattr(ev, "reference", no_images)
    again = invoke("evaluate", "digits", "--data", "digits-test", "--features", "classifier",
                   "--run-dir", tmp_path / "b", *EVAL)  # a new run: found in the user cache
    assert again["fid"] == first["fid"] and len(list((tmp_path / "b" / "refstats").glob("*.npz"))) == 1
    with pytest.raises(AssertionError, match="recomputed"):  # other features: another key
        invoke("evaluate", "digits", "--data", "digits-test", "--features", "judge", "--run-dir", tmp_path / "c", *EVAL)


def test_an_npz_of_images_is_not_a_stats_file(tmp_path):
    path = tmp_path / "images.npz"
    np.savez(path, images=np.zeros((4, 16, 16, 1), np.uint8))
    assert not is_stats_file(str(path))
    with pytest.raises(PgraftError, match="not a pgraft stats file"):
        load_stats(path)


def test_a_stats_file_whose_arrays_disagree_is_one_error(tmp_path):
    # KID drew its reference subsets' size from n, not from the rows stored: a file with fewer rows than n
    # (written by hand or another tool) gave a KID of 0.64 between two samples of one distribution.
    from pgraft_cli.io.refstats import save_stats

    good = tmp_path / "ref.npz"
    invoke("stats", "digits-test", "--features", "classifier", "--out", good, "--json")
    state, meta = load_stats(good)
    meta = {k: v for k, v in meta.items() if k != "format"}
    n, d = int(state["n"]), state["mu"].shape[0]
    no_rows = save_stats(tmp_path / "norows.npz", {**state, "features": np.zeros((0, d), np.float32)}, meta)
    assert load_stats(no_rows)[0]["features"].shape == (0, d)  # FID only: allowed
    bad = {"trimmed": {"features": state["features"][: n // 2]}, "wide": {"features": np.zeros((n, d + 1), np.float32)},
           "cov": {"cov_sum": state["cov_sum"][:-1]}, "mu": {"mu": state["mu"][:-1]}, "n": {"n": np.array(1)},
           "n_float": {"n": np.array(float(n))}}
    for name, change in bad.items():
        path = save_stats(tmp_path / f"{name}.npz", {**state, **change}, meta)
        with pytest.raises(PgraftError, match="not a pgraft stats file"):
            load_stats(path)
    code = runner.invoke(app, ["evaluate", "digits", "--data", str(tmp_path / "trimmed.npz"), *EVAL,
                               "--run-dir", str(tmp_path / "run")])
    assert isinstance(code.exception, PgraftError) and "features has shape" in str(code.exception)


def test_stats_needs_a_shape_for_a_folder(tmp_path):
    result = runner.invoke(app, ["stats", str(tmp_path), "--out", str(tmp_path / "r.npz")])
    assert isinstance(result.exception, PgraftError) and "--shape" in str(result.exception)


def test_a_changed_resize_rule_or_stats_version_misses_the_cache(tmp_path, monkeypatch):
    """Data resized by another rule gives other statistics: the cache key holds the rule and a version."""
    import pgraft_cli.io.data as data
    import pgraft_cli.io.refstats as refstats

    feats, calls = ev.classifier_features(), []
    real_reference = ev.reference
    monkeypatch.setattr(ev, "reference", lambda *a, **k: calls.append(1) or real_reference(*a, **k))
    ev.cached_reference(feats, "digits-test", (1, 16, 16), run_root=tmp_path)
    ev.cached_reference(feats, "digits-test", (1, 16, 16), run_root=tmp_path)
    assert len(calls) == 1  # the second found the first's statistics
    monkeypatch.setattr(data, "RESIZE_RULES", {**data.RESIZE_RULES, "digits": "nearest"})
    ev.cached_reference(feats, "digits-test", (1, 16, 16), run_root=tmp_path)
    assert len(calls) == 2
    monkeypatch.setattr(refstats, "STATS_VERSION", refstats.STATS_VERSION + 1)
    ev.cached_reference(feats, "digits-test", (1, 16, 16), run_root=tmp_path)
    assert len(calls) == 3 and len(list((tmp_path / "refstats").glob("*.npz"))) == 3
