"""The metrics table of a run: one model (:class:`MetricsTable`), built once per verb from its summary
(:func:`metrics_table_of`), that the terminal (``ui.metrics_view``) and report.html
(``html._metrics_html``) both render, so the two show the same rows, columns and formatted numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Column:
    """One metric: its summary key, header, format, and whether lower is better (None: neither)."""

    key: str
    header: str
    fmt: Callable[[Any], str]
    lower: Optional[bool]


# Every metric a row may hold, in table order; a table shows those some row has.
COLUMNS = (
    Column("fid", "FID", lambda v: f"{v:.3f}", True),
    Column("kid", "KID", lambda v: f"{v:.4f}", True),
    Column("precision", "precision", lambda v: f"{v:.3f}", False),
    Column("recall", "recall", lambda v: f"{v:.3f}", False),
    Column("copy_auc", "copy AUC", lambda v: f"{v:.3f}", None),  # correct's data-copying test: 0.5 as unseen images
    Column("pairwise_distance", "pairwise distance", lambda v: f"{v:.4g}", False),
    Column("reward_mean", "reward mean", lambda v: f"{v:.4f}", False),
    Column("reward_std", "reward std", lambda v: f"{v:.4f}", None),
    Column("reward_best_of_mean", "best-of-n reward", lambda v: f"{v:.4f}", False),
    Column("nfe", "NFE", lambda v: f"{int(v)}", True),
    Column("flops_per_image", "GFLOPs/img", lambda v: f"{v / 1e9:.3f}", True),
    Column("seconds_per_image", "ms/img", lambda v: f"{1000 * v:.2f}", True),
    Column("num", "num", lambda v: f"{int(v)}", None),
    # what a fine-tuning round kept and trained (rows of the rounds table only)
    Column("kept", "kept", lambda v: f"{int(v)}", None),
    Column("kept_reward_mean", "kept reward", lambda v: f"{v:.4f}", None),
    Column("final_loss", "final loss", lambda v: f"{v:.4f}", None),
)
ALSO = "fid_vs:"  # key prefix of the FID against a further reference (``also_against``)
JUDGE = "judge."  # key prefix of a judge's mean (``judges``: rewards measured, never optimised)


def fmt_metric(key: str, value: Any) -> str:
    """How the terminal and the report write a metric value ("-" when it was not measured)."""
    if value is None:
        return "-"
    for c in COLUMNS:
        if c.key == key:
            return c.fmt(value)
    if key.startswith(JUDGE):
        return f"{value:.4f}"
    return f"{value:.3f}" if key.startswith(ALSO) else (f"{value:.4g}" if isinstance(value, float) else str(value))


@dataclass
class MetricRow:
    """One sampler's metrics: ``id`` names it for machines (``base``, ``tuned`` ...), ``label`` for people."""

    id: str
    label: str
    values: dict[str, Any]

    def get(self, key: str) -> Any:
        """A metric by key; ``fid_vs:NAME`` is the FID against the further reference NAME, ``judge.NAME``
        the mean of judge NAME."""
        if key.startswith(ALSO):
            return ((self.values.get("also_against") or {}).get(key[len(ALSO):]) or {}).get("fid")
        if key.startswith(JUDGE):
            return (self.values.get("judges") or {}).get(key[len(JUDGE):])
        return self.values.get(key)


@dataclass
class MetricsTable:
    """Rows of samplers measured alike; the columns are the metrics some row has (``compare``: a change
    row between two rows)."""

    rows: list[MetricRow]
    compare: bool = True
    columns: list[Column] = field(init=False)

    def __post_init__(self) -> None:
        also = list((self.rows[0].values.get("also_against") or {}) if self.rows else [])
        judges = dict.fromkeys(n for r in self.rows for n in r.values.get("judges") or {})
        found = [c for c in COLUMNS if any(r.get(c.key) is not None for r in self.rows)]
        at = next((i + 1 for i, c in enumerate(found) if c.key == "fid"), 0)
        extra = [Column(f"{ALSO}{name}", f"FID vs {name}", lambda v: f"{v:.3f}", True) for name in also]
        found = found[:at] + extra + found[at:]
        at = 1 + max((i for i, c in enumerate(found) if c.key.startswith("reward")), default=len(found) - 1)
        judged = [Column(f"{JUDGE}{n}", f"{JUDGE}{n}", lambda v: f"{v:.4f}", False) for n in judges]
        self.columns = found[:at] + judged + found[at:]

    def cell(self, row: MetricRow, column: Column) -> str:
        return fmt_metric(column.key, row.get(column.key))

    def best_fid(self) -> Optional[str]:
        """The id of the row with the lowest FID, when several rows have one."""
        fids = [(r.get("fid"), r.id) for r in self.rows if r.get("fid") is not None]
        return min(fids)[1] if len(fids) > 1 else None

    def change(self) -> Optional[list[tuple[str, Optional[bool]]]]:
        """Second row minus first, per column, with two rows: (text, True if it went the better way,
        False the worse, None for no verdict or no change); None with another number of rows."""
        if len(self.rows) != 2 or not self.compare:
            return None
        a, b = self.rows
        cells: list[tuple[str, Optional[bool]]] = []
        for c in self.columns:
            if a.get(c.key) is None or b.get(c.key) is None or c.key == "num":
                cells.append(("", None))
                continue
            d = b.get(c.key) - a.get(c.key)
            shown = c.fmt(abs(d))
            if shown == c.fmt(0.0):  # too small to show at these digits: no change, whichever its sign
                d = 0.0
            better = None if c.lower is None or d == 0 else (d < 0) == c.lower
            cells.append((("+" if d >= 0 else "-") + shown, better))
        return cells

    def warnings(self) -> list[tuple[MetricRow, str]]:
        """Each row's metric warnings (e.g. fewer samples than feature dimensions)."""
        return [(r, w) for r in self.rows for w in r.values.get("warnings") or []]

    def notes(self) -> list[str]:
        """Notes of the rows (e.g. why FID was skipped), each once."""
        return list(dict.fromkeys(n for r in self.rows for n in r.values.get("notes") or []))


def metrics_table_of(verb: str, summary: dict[str, Any]) -> Optional[MetricsTable]:
    """The metrics table of a verb's summary (its ``--json`` object, or the run's summary artifact)."""
    if verb == "correct":
        steps, info = summary["base"].get("steps"), summary.get("corrector") or {}
        corrector = summary.get("corrector_steps")
        return MetricsTable([
            MetricRow("base", f"base ({steps} steps)", summary["base"]),
            MetricRow("corrected", f"corrected ({info.get('kind')}"
                      + (f", {corrector} + {steps} steps)" if corrector is not None else ")"), summary["corrected"])])
    if verb == "finetune":
        return MetricsTable([MetricRow("base", "base", summary["base"]), MetricRow("tuned", "tuned", summary["tuned"])])
    if verb == "evaluate":
        label = "corrected" if summary.get("corrected") else (
            f"fine-tuned (cutoff {summary.get('cutoff')})" if summary.get("finetuned") else "base")
        return MetricsTable([MetricRow("model", f"{label} ({summary.get('steps')} steps)", summary)])
    return None


def copy_tests(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(sampler, copying)`` of ``correct``'s base and corrected samples where the copy test ran
    (``stages.evaluate.copying``), for the terminal and report.html alike."""
    tests = [(name, (summary.get(name) or {}).get("copying")) for name in ("base", "corrected")]
    return [(name, c) for name, c in tests if c]


def cell_tests(tests: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``(sampler, cells)`` of ``copy_tests`` where the cell-wise statistic was measured (some cell qualified)."""
    return [(name, c["cells"]) for name, c in tests if (c.get("cells") or {}).get("c_t") is not None]


ROUND_KEYS = ("fid", "kid", "precision", "recall", "pairwise_distance", "kept", "kept_reward_mean")


def rounds_table_of(summary: dict[str, Any]) -> Optional[MetricsTable]:
    """``pgraft finetune``'s rounds, one row each: the training reward, the judges, FID and diversity
    of the round's samples (the model entering it), then what it kept and its final loss."""
    rounds = summary.get("rounds") or []
    if not rounds:
        return None
    return MetricsTable([MetricRow(f"round-{h['round']}", f"round {h['round']}", {
        "reward_mean": h["sampled"]["reward_mean"], "judges": h.get("judges"), **{k: h.get(k) for k in ROUND_KEYS},
        "final_loss": (h.get("finetune") or {}).get("final_loss")}) for h in rounds], compare=False)
