"""report.html of real small runs, opened in headless Chromium; the `report` verb; text-model grids."""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli_run
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.report.html import render_report
from pgraft_cli.report.metrics import fmt_metric

runner = CliRunner()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Shrunk recipes: the real defaults run minutes; these keep every stage and plot, in seconds.
SMALL_CORRECT = ["--set", "correct.base_steps=4", "--set", "correct.num_images=64", "--set", "correct.inversion_iterations=8",
                 "--set", "correct.corrector_train_steps=20", "--set", "correct.corrector_batch_size=32", "--set",
                 "correct.corrector_sample_steps=2", "--set", "evaluate.num=64", "--set", "evaluate.kid_subsets=2",
                 "--set", "correct.max_reconstruction_rms=0.05"]
SMALL_FINETUNE = ["--set", "sample.num=32", "--set", "sample.steps=8", "--set", "sample.batch_size=16",
                  "--set", "finetune.steps=4", "--set", "finetune.batch_size=8", "--set", "finetune.rounds=2",
                  "--set", "evaluate.num=32", "--set", "evaluate.kid_subsets=2"]


def _summary(result) -> dict:
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.output  # --json: one object and nothing else on stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def correct_run(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("report") / "correct"
    result = runner.invoke(app, ["correct", "digits", "--run-dir", str(run), "--json", *SMALL_CORRECT,
                                 "--fail-if", "fid>1e9", "--fail-if", "base.nfe!=4"])
    assert result.exit_code == 0, result.output
    return run, _summary(result)


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> tuple[Path, dict]:
    """A P-GRAFT run whose reward gate fails: exit 1, yet every output and the report are written."""
    run = tmp_path_factory.mktemp("report") / "finetune"
    result = runner.invoke(app, ["finetune", "digits", "--reward", "classifier:digits:3", "--cutoff", "0.5",
                                 "--run-dir", str(run), "--json", *SMALL_FINETUNE, "--fail-if", "reward<1e9"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("gate failed: reward<1e9 (reward_mean = ")
    return run, _summary(result)


# ----------------------------------------------------------------------------------------------
# Headless Chromium


def _chromium() -> str | None:
    for name in (os.environ.get("PGRAFT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# Appended to a copy of the report (the report itself has no script): after load, write each
# image's naturalWidth into the DOM, which --dump-dom then prints.
PROBE = """<script>window.addEventListener("load", function () {
  var w = []; document.querySelectorAll("img").forEach(function (i) { w.push([i.id, i.naturalWidth]); });
  var p = document.createElement("pre"); p.id = "pgraft-probe"; p.textContent = JSON.stringify(w);
  document.body.appendChild(p);
});</script>"""
# A broken image: the probe must report it as 0 wide, or the check proves nothing.
CONTROL = '<img id="broken-control" alt="" src="data:image/png;base64,AAAA">'


def _browse(report: Path, name: str, tmp: Path) -> tuple[str, Path]:
    """Screenshot ``report`` into test-artifacts/ and return the DOM after load, probed."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (chromium, chromium-browser or google-chrome) on PATH; "
                    ".ci/run installs Debian's chromium where apt-get is available")
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1280,4200"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{name}.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*common, f"--screenshot={shot}", report.resolve().as_uri()], capture_output=True, timeout=90,
                   check=True)
    probed = tmp / f"{name}-probed.html"
    probed.write_text(report.read_text().replace("</body>", CONTROL + PROBE + "</body>"))
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    return dom, shot


class _Metrics(html.parser.HTMLParser):
    """Cells of <table id="metrics">: {(row, metric): (data-value, text)}."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], tuple[str, str]] = {}
        self._in_table, self._row, self._cell = False, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "metrics":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self._row = a.get("data-row")
        elif self._in_table and tag == "td" and "data-metric" in a:
            self._cell = [a["data-metric"], a["data-value"], ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells[(self._row, self._cell[0])] = (self._cell[1], self._cell[2].strip())
            self._cell = None
        elif tag == "table":
            self._in_table = False


def _check_page(dom: str, shot: Path, rows: dict[str, dict], metrics: list[str]) -> None:
    probe = re.search(r'<pre id="pgraft-probe">(.*?)</pre>', dom, re.S)
    assert probe, "the probe script did not run"
    widths = json.loads(probe.group(1).replace("&quot;", '"'))
    report_imgs = [w for i, w in widths if i != "broken-control"]
    assert dict(widths)["broken-control"] == 0
    assert len(report_imgs) >= 5 and all(w > 0 for w in report_imgs), widths
    parser = _Metrics()
    parser.feed(dom)
    for row, values in rows.items():
        for m in metrics:
            raw, text = parser.cells[(row, m)]
            assert json.loads(raw) == values[m], (row, m)
            assert text == fmt_metric(m, values[m]), (row, m, text)
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_of_a_correct_run_in_chromium(correct_run, tmp_path):
    run, summary = correct_run
    report = Path(summary["report"])
    assert report == run / "report.html" and report.is_file()
    assert [g["failed"] for g in summary["gates"]] == [False, False]
    page = report.read_text()
    for heading in ("Metrics", "Samples", "FID against FLOPs", "Inversion", "Corrector", "Provenance"):
        assert f"<h2>{heading}</h2>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert "recipe.toml" in page and "evaluate-corrected" in page
    assert summary["fid_data"] == "digits-test" and "FID against" in page and "digits-test" in page  # not only "data"
    dom, shot = _browse(report, "correct", tmp_path)
    _check_page(dom, shot, {"base": summary["base"], "corrected": summary["corrected"]},
                ["fid", "kid", "nfe", "flops_per_image", "seconds_per_image", "num"])
    # provenance: the recorded device and time, the output checkpoint's hash
    prov = json.loads((run / "provenance.json").read_text())["correct"]
    assert prov["device"] == "cpu" and prov["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert prov["out_sha256"] in page


@pytest.mark.slow
def test_report_of_a_finetune_run_in_chromium(finetune_run, tmp_path):
    run, summary = finetune_run
    report = run / "report.html"
    assert summary["report"] == str(report) and summary["gates"][0]["failed"] is True
    page = report.read_text()
    for heading in ("Filtering", "Reshaped reward", "Rounds", "Cutoff", "Fine-tuning", "Provenance"):
        assert f"<h2>{heading}</h2>" in page
    assert "P-GRAFT fine-tuning (cutoff 0.5)" in page
    assert summary["fid_data"] == "digits-test" and "FID against" in page and "digits-test" in page
    dom, shot = _browse(report, "finetune", tmp_path)
    _check_page(dom, shot, {"base": summary["base"], "tuned": summary["tuned"]},
                ["fid", "reward_mean", "reward_std", "nfe", "flops_per_image", "num"])


@pytest.mark.slow
def test_fid_per_round_keeps_the_rounds_and_the_evaluations_apart(finetune_run, monkeypatch):
    """The rounds' FIDs (each round's own seed and sample.num) and the evaluations' (evaluate.seed, evaluate.num)
    were one line sorted by x, two points at x = 0 joined as if one protocol."""
    import pgraft_cli.report.html as html

    run, summary = finetune_run
    figures = {}
    real = html._plot
    monkeypatch.setattr(html, "_plot", lambda fig, alt, caption: figures.setdefault(alt, fig) and real(fig, alt, caption))
    html.render_report(run)
    ax = figures["reward, judges, FID and diversity per round"].axes[1]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines == {"sampled (model entering the round)": [r["fid"] for r in summary["rounds"]]}
    points = [list(c.get_offsets()[:, 1]) for c in ax.collections]
    assert points == [[summary["base"]["fid"], summary["tuned"]["fid"]]]


@pytest.mark.slow
def test_report_verb_re_renders_and_refuses_a_non_run(correct_run, tmp_path):
    run, _ = correct_run
    before = (run / "report.html").stat().st_mtime_ns
    result = runner.invoke(app, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"run_dir": str(run), "report": str(run / "report.html")}
    assert (run / "report.html").stat().st_mtime_ns >= before
    # the device and time the run recorded survive a re-render
    assert "whole command (correct)" in (run / "report.html").read_text()
    bad = cli_run("report", tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "not a pgraft run directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_text_model_samples_show_their_prompts(tmp_path):
    """A sample stage with prompts: the report shows a table of prompt and image per index."""
    stage = tmp_path / "sample"
    stage.mkdir()
    images = torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8)
    save_file({"index": torch.arange(4), "images": images, "prompt_index": torch.tensor([0, 1, 0, 1])},
              str(stage / "shard-00000.safetensors"))
    (stage / "settings.json").write_text(json.dumps({"num": 4, "seed": 7, "steps": 3,
                                                     "prompts": ["a red cube", "a <blue> sphere"]}))
    (tmp_path / "manifest.json").write_text(json.dumps({"pgraft_version": "0", "stages": {"sample": {
        "status": "done", "key": "k", "seconds": 1.5, "config": {"seed": 7, "steps": 3, "num": 4},
        "inputs": {"model": "f" * 64}}}}))
    page = render_report(tmp_path).read_text()
    assert 'class="prompts"' in page and "a red cube" in page and "a &lt;blue&gt; sphere" in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "seed 7" in page and "f" * 64 in page
