"""report/metrics.py: one metrics-table model, rendered alike by the terminal and by report.html."""

from __future__ import annotations

import html.parser

from rich.console import Console

from pgraft_cli.report.html import _metrics_html
from pgraft_cli.report.metrics import metrics_table_of
from pgraft_cli.report.ui import metrics_view


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
