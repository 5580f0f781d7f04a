"""report/metrics.py: one metrics-table model, rendered alike by the terminal and by report.html."""

from __future__ import annotations

import html.parser

from rich.console import Console

from pgraft_cli.report.html import _metrics_html
from pgraft_cli.report.metrics import metrics_table_of, rounds_table_of
from pgraft_cli.report.ui import finetune_report, metrics_view


def _sampler(fid, kid, flops, seconds, **extra):
    return {"fid": fid, "kid": kid, "nfe": 4, "flops_per_image": flops, "seconds_per_image": seconds, "num": 64,
            "steps": 4, "precision": None, "warnings": [], "notes": [], **extra}


SUMMARY = {
    "base": _sampler(10.0, 0.0125, 2.5e9, 0.0125, also_against={"digits-train": {"fid": 9.0}},
                     warnings=["fewer samples than feature dimensions"], notes=["shared note"]),
    "corrected": _sampler(8.5, 0.02, 3.0e9, 0.015, also_against={"digits-train": {"fid": 7.25}}, notes=["shared note"]),
    "corrector": {"kind": "flow"}, "corrector_steps": 2,
}


class _Cells(html.parser.HTMLParser):
    """Text of each <tr> of the metrics table, cell by cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell.strip())
            self._cell = None


def test_one_model_gives_the_same_rows_columns_and_numbers_in_the_terminal_and_the_report():
    model = metrics_table_of("correct", SUMMARY)
    # columns: the metrics some row has (precision is None everywhere), the further reference after FID
    assert [c.header for c in model.columns] == ["FID", "FID vs digits-train", "KID", "NFE", "GFLOPs/img", "ms/img", "num"]
    assert [r.label for r in model.rows] == ["base (4 steps)", "corrected (flow, 2 + 4 steps)"]
    parser = _Cells()
    parser.feed(_metrics_html(model))
    head, base, corrected, change = parser.rows
    assert head == ["model", "FID", "FID vs digits-train", "KID", "NFE", "GFLOPs/img", "ms/img", "num"]
    assert base == ["base (4 steps)", "10.000", "9.000", "0.0125", "4", "2.500", "12.50", "64"]
    assert corrected == ["corrected (flow, 2 + 4 steps)", "8.500", "7.250", "0.0200", "4", "3.000", "15.00", "64"]
    # corrected - base: 8.5 - 10 = -1.5 (better), 0.02 - 0.0125 = +0.0075 (worse), no change in NFE
    assert change == ["change", "-1.500", "-1.750", "+0.0075", "+0", "+0.500", "+2.50", ""]
    console = Console(record=True, width=400)
    console.print(metrics_view("title", "correct", SUMMARY))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()
             if line.startswith("│")}
    assert lines["base (4 steps)"] == base[1:] and lines["corrected (flow, 2 + 4 steps)"] == corrected[1:]
    assert lines["change"] == change[1:]
    # warnings per row, a note shared by the rows once, in both
    assert text.count("warning (base (4 steps)): fewer samples than feature dimensions") == 1
    assert text.count("note: shared note") == 1
    page = _metrics_html(model)
    assert page.count("note: shared note") == 1 and 'data-warning="base"' in page
    # a terminal too narrow for a column per metric gets a column per sampler: the same cells, transposed
    narrow = Console(record=True, width=100)
    narrow.print(metrics_view("title", "correct", SUMMARY))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in narrow.export_text().splitlines() if line.startswith("│")}
    for i, name in enumerate(head[1:]):
        assert rows[name] == [base[i + 1], corrected[i + 1], change[i + 1]], name


def test_evaluate_and_finetune_tables_are_built_from_their_summaries():
    one = metrics_table_of("evaluate", {**_sampler(None, None, 1e9, 0.001), "corrected": False, "finetuned": True,
                                        "cutoff": 0.5, "reward_mean": 0.25, "reward_std": 0.125})
    assert [r.label for r in one.rows] == ["fine-tuned (cutoff 0.5) (4 steps)"] and one.change() is None
    assert [c.key for c in one.columns] == ["reward_mean", "reward_std", "nfe", "flops_per_image", "seconds_per_image",
                                            "num"]  # reward only: no FID, KID columns
    pair = metrics_table_of("finetune", {"base": _sampler(5.0, 0.1, 1e9, 0.001, reward_mean=0.5),
                                         "tuned": _sampler(6.0, 0.1, 1e9, 0.001, reward_mean=0.75)})
    assert pair.best_fid() == "base"
    change = dict(zip([c.key for c in pair.columns], pair.change()))
    assert change["fid"] == ("+1.000", False) and change["reward_mean"] == ("+0.2500", True)
    assert change["kid"] == ("+0.0000", None)
    assert metrics_table_of("sample", {}) is None


def test_judges_are_columns_after_the_reward_and_rounds_use_the_same_model_without_a_change_row():
    base = _sampler(5.0, 0.1, 1e9, 0.001, reward_mean=0.5, reward_std=0.25, judges={"aes": 2.0, "j": -1.0},
                    features="classifier:digits")
    tuned = _sampler(6.0, 0.1, 1e9, 0.001, reward_mean=0.75, reward_std=0.25, judges={"aes": 1.5, "j": -0.5},
                     features="classifier:digits")
    rounds = [{"round": 1, "sampled": {"reward_mean": 0.5}, "judges": {"aes": 2.0, "j": -1.0}, "fid": 7.0,
               "pairwise_distance": 0.125, "kept": 8, "kept_reward_mean": 0.875, "finetune": {"final_loss": 0.0625}},
              {"round": 2, "sampled": {"reward_mean": 0.625}, "judges": {"aes": 1.75, "j": -0.75}, "fid": 6.5,
               "pairwise_distance": 0.0625, "stopped": "judge.aes dropped by 0.25"}]
    summary = {"cutoff": 0.5, "reward": "classifier:digits:3", "base": base, "tuned": tuned, "rounds": rounds,
               "stopped": {"round": 2, "reason": "judge.aes dropped by 0.25", "rounds_kept": 0}, "fid_data": "digits-test"}
    pair = metrics_table_of("finetune", summary)
    keys = [c.key for c in pair.columns]
    assert keys[keys.index("reward_std") + 1:][:2] == ["judge.aes", "judge.j"]
    change = dict(zip(keys, pair.change()))
    assert change["judge.aes"] == ("-0.5000", False) and change["judge.j"] == ("+0.5000", True)  # judges: higher is better
    table = rounds_table_of(summary)
    assert [c.header for c in table.columns] == ["FID", "pairwise distance", "reward mean", "judge.aes", "judge.j",
                                                 "kept", "kept reward", "final loss"]
    assert table.change() is None and table.best_fid() == "round-2"
    parser = _Cells()
    parser.feed(_metrics_html(table, "rounds", "round", note=""))
    head, one, two = parser.rows
    assert head[0] == "round" and one == ["round 1", "7.000", "0.125", "0.5000", "2.0000", "-1.0000", "8", "0.8750",
                                          "0.0625"]
    assert two == ["round 2", "6.500", "0.0625", "0.6250", "1.7500", "-0.7500", "-", "-", "-"]  # stopped: not trained
    console = Console(record=True, width=400)
    console.print(finetune_report(summary))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in text.splitlines()
             if line.startswith("│")}
    assert lines["round 1"] == one[1:] and lines["round 2"] == two[1:]
    assert "stopped early at round 2: judge.aes dropped by 0.25" in text
    # the title names FID's reference and features, as evaluate's and correct's do
    assert "reward classifier:digits:3, FID against digits-test (features classifier:digits)" in text


def test_a_change_too_small_to_show_has_no_verdict_whichever_its_sign():
    """A change that rounds to zero at the column's digits reads as no change, in green or red
    neither, whether it is a hair down or a hair up (a tiny decrease was written "-0.000", better)."""
    for a, b in ((1.23414, 1.23386), (1.23386, 1.23414)):
        pair = metrics_table_of("finetune", {"base": _sampler(a, 0.1, 1e9 * a, 0.001 * a),
                                             "tuned": _sampler(b, 0.1, 1e9 * b, 0.001 * b)})
        change = dict(zip([c.key for c in pair.columns], pair.change()))
        assert change["fid"] == ("+0.000", None) and change["flops_per_image"] == ("+0.000", None)
        assert change["seconds_per_image"] == ("+0.00", None)
