"""Terminal output: a stderr console for humans, stdout for results, progress bars with rate and ETA."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console, ConsoleOptions, Group
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from ..core.metrics import COPY_CELL_MIN_HELDOUT, COPY_CELL_MIN_SAMPLES
from .metrics import MetricsTable, cell_tests, copy_tests

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"-- {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


class _NullProgress:
    """Stands in for a Progress when bars are hidden (--quiet, --json, non-main processes)."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def advance(self, *args: object, **kwargs: object) -> None:
        pass

    def update(self, *args: object, **kwargs: object) -> None:
        pass


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Progress | _NullProgress]:
    """A rich progress display on stderr (rate and ETA on every bar), or a silent stand-in."""
    if not enabled:
        yield _NullProgress()
        return
    bar = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, transient=False,
    )
    with bar:
        yield bar


def error_line(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:  # one line however long, as error_line: a log keeps it whole
        err.print(message, soft_wrap=True)


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _histogram_rows(edges: list[float], before: list[int], after: list[int], width: int = 30) -> list[str]:
    """A text histogram: one row per bin, before (grey) and kept (green) counts as bars."""
    top = max(before) or 1
    rows = []
    for i, (b, a) in enumerate(zip(before, after)):
        lo = edges[i]
        bar_b = "█" * round(width * b / top)
        bar_a = "█" * round(width * a / top)
        rows.append(f"{lo:>9.3f} │[dim]{bar_b.ljust(width)}[/dim] {b:>5}  │[green]{bar_a.ljust(width)}[/green] {a:>5}")
    return rows


def filter_report(summary: dict) -> Group:
    """What ``pgraft filter`` did: kept counts, rewards before/after, the rule's tilt, a histogram."""
    from rich.table import Table

    table = Table(title=f"filter: {summary['rule']} {summary.get('params', {})}", title_justify="left")
    for col in ("", "num", "reward mean", "std", "min", "max"):
        table.add_column(col, justify="left" if not col else "right")
    for name, stats, n in (("sampled", summary["reward_before"], summary["num"]),
                           ("kept", summary["reward_after"], summary["kept"])):
        table.add_row(name, str(n), *(("-" if stats[k] is None else f"{stats[k]:.4f}") for k in ("mean", "std", "min", "max")))
    expected = summary.get("expected_kept_fraction")
    lines = [f"kept {summary['kept']} of {summary['num']} ({100 * summary['kept_fraction']:.1f}%"
             + (f"; the rule's expected {100 * expected:.1f}%)" if expected is not None else ")")]
    if summary.get("reshaped_reward_mean") is not None:
        scope = (f"F within each prompt or class, from at least {summary.get('cdf_samples_min')} rewards"
                 if summary.get("cdf_scope") == "condition" else "F over the batch")
        lines.append(f"reshaped reward rhat = log P(keep | F(r)) of the kept samples: mean "
                     f"{summary['reshaped_reward_mean']:.3f} ({scope})")
    curve = _reshaped_curve(summary)
    if curve:
        lines.append("the rule's reshaped reward rhat(F), F = the reward's CDF under the model: "
                     + ", ".join(f"F={f:g}: {v}" for f, v in curve))
    lines.append("reward histogram: all samples | kept")
    lines += _histogram_rows(summary["histogram_edges"], summary["histogram_before"], summary["histogram_after"])
    return Group(table, *lines)


def _reshaped_curve(summary: dict) -> list[tuple[float, str]]:
    """rhat at a few CDF values for the rule used (docs/methods.md section 1), for the terminal."""
    from ..core.selection import reshaped_reward

    rule = summary["rule"]
    if rule == "threshold":
        return []  # 0 above tau, -inf below
    acc = summary["acceptance"]
    import torch

    points = [0.1, 0.25, 0.5, 0.75, 0.9]
    values = reshaped_reward(rule, torch.tensor(points, dtype=torch.float64), **acc)
    return [(f, f"{float(v):.2f}") for f, v in zip(points, values)]


def finetune_report(summary: dict) -> Group:
    """Base vs tuned after ``pgraft finetune``: the metrics table, then the rounds."""
    from .metrics import rounds_table_of

    features = (summary.get("tuned") or {}).get("features")
    against = f", FID against {summary['fid_data']}" if summary.get("fid_data") else ""
    title = (f"{'P-GRAFT' if summary['cutoff'] > 0 else 'GRAFT'} (cutoff {summary['cutoff']}), "
             f"reward {summary['reward']}{against}{f' (features {features})' if features else ''}")
    parts: list = [metrics_view(title, "finetune", summary)]
    if summary.get("stopped"):
        parts.append(Text(stopped_line(summary["stopped"]), style="yellow"))
    rounds = rounds_table_of(summary)
    if rounds is not None:
        parts.append(table_view("rounds (training reward, judges, FID and diversity of each round's samples)",
                                rounds, "round"))
    return Group(*parts)


def stopped_line(stopped: dict) -> str:
    """What ``--stop-if`` did: where, why, and which model the checkpoint holds."""
    k = stopped["rounds_kept"]
    return (f"stopped early at round {stopped['round']}: {stopped['reason']}; the checkpoint holds the last model that "
            f"passed, after {k} round{'s' * (k != 1)} of fine-tuning (round {k + 1}'s samples)")


class _Fit:
    """The first of ``choices`` whose unwrapped width fits the console (else the last), chosen when printed."""

    def __init__(self, *choices: object) -> None:
        self.choices = choices

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[object]:
        from rich.measure import Measurement

        wide = options.update(max_width=10_000)  # the unwrapped width, not the width it would be squeezed to
        fits = (c for c in self.choices[:-1] if Measurement.get(console, wide, c).maximum <= options.max_width)
        yield next(fits, self.choices[-1])


def metrics_view(title: str, verb: str, summary: dict) -> Group:
    """The verb's metrics table (``report.metrics``, as report.html shows it): one row per sampler, the
    lowest FID in green, the change between two rows (one column per sampler where the terminal is too
    narrow for one per metric); then one line per warning and note."""
    from ..stages.evaluate import COST_NOTE
    from .metrics import metrics_table_of

    return table_view(title, metrics_table_of(verb, summary), "sampler", COST_NOTE)


def table_view(title: str, model: MetricsTable, first: str, caption: Optional[str] = None) -> Group:
    """A :class:`report.metrics.MetricsTable` in the terminal (``first``: the header of the rows' labels)."""
    from rich.table import Table

    best, change = model.best_fid(), model.change()
    colour = {True: "green", False: "red", None: "dim"}
    cells = {row.id: [f"[green]{model.cell(row, c)}[/green]" if c.key == "fid" and row.id == best else model.cell(row, c)
                      for c in model.columns] for row in model.rows}
    changed = [f"[{colour[b]}]{t}[/]" if t else "" for t, b in change or []]
    wide, tall = (Table(title=title, title_justify="left", caption=caption, caption_justify="left") for _ in "ab")
    wide.add_column(first, justify="left")
    tall.add_column("metric", justify="left")
    for c in model.columns:
        wide.add_column(c.header, justify="right")
    for row in model.rows:
        wide.add_row(row.label, *cells[row.id])
        tall.add_column(row.label, justify="right")
    if change:
        wide.add_row("[dim]change[/dim]", *changed)
        tall.add_column("change", justify="right")
    for i, c in enumerate(model.columns):
        tall.add_row(c.header, *(cells[r.id][i] for r in model.rows), *changed[i:i + 1])
    return Group(_Fit(wide, tall), *(Text(f"warning ({row.label}): {w}", style="yellow") for row, w in model.warnings()),
                 *(Text(f"note: {n}") for n in model.notes()))


def copy_lines(summary: dict) -> list[str]:
    """The data-copying test of ``correct``'s base and corrected samples (``stages.evaluate.copying``), in
    three lines; none where it was not run."""
    both = copy_tests(summary)
    corr = dict(both).get("corrected")
    if not corr:
        return []
    auc = ", ".join(f"{name} {c['auc']:.3f} (Z {c['z']:+.1f})" for name, c in both)
    near = ", ".join(f"{name} {c['near']:.1%}" for name, c in both)
    q = f"{corr['near_quantile'] * 100:g}th"
    return [f"copy test ({summary['corrected'].get('features')}): each sample's distance to its nearest {corr['train']} "
            f"image against each held-out image's ({summary.get('fid_data')}): AUC {auc}; 0.5 as unseen images, below: "
            f"nearer, as copies would be (or samples bunched where the training images are dense), above: farther",
            f"  below the held-out {q} percentile: {near} ({corr['near_null']:.1%} +- {corr['near_null_se']:.1%} for "
            f"samples drawn like the held-out images)",
            *cell_lines(both, corr["train"]),
            "  each misses some copiers: copies spread over all regions hide from the AUC and the cells and show "
            "sooner in the share below the percentile; a region copied whole shows in the lowest cell's p; samples "
            "bunched where the training images are dense read like copies in all of them; read the corrected "
            "sampler against the base"]


def cell_lines(tests: list, train: str) -> list[str]:
    """The cell-wise copy statistic's line (``core.metrics.cell_copy_stat``) of the samplers ``tests``
    (``(name, copying)`` pairs), where it was measured."""
    cells = cell_tests(tests)
    if not cells:
        last = tests[-1][1]
        if not last.get("cells"):
            return []
        return [f"  {last['cells']['cells']} k-means cells of the {train} images: none has more than "
                f"{COPY_CELL_MIN_SAMPLES} of the {last['num']} samples and {COPY_CELL_MIN_HELDOUT} held-out images, so "
                f"C_T and the lowest cell's p were not measured (raise evaluate.num)"]
    ct = ", ".join(f"{name} {c['c_t']:+.2f}" for name, c in cells)
    low = ", ".join(f"{name} {c['z_min']:+.2f} (p {c['p_min']:.2g})" for name, c in cells)
    used = ", ".join(f"{name} {c['cells_used']}" for name, c in cells)
    return [f"  {cells[-1][1]['cells']} k-means cells of the {train} images (used, with more than {COPY_CELL_MIN_SAMPLES} "
            f"samples and {COPY_CELL_MIN_HELDOUT} held-out images: {used}): C_T {ct}, the cells' Z weighted by their "
            f"held-out images; the lowest cell's Z {low}, p corrected for the cells used (Bonferroni): a region whose "
            f"samples are (nearly) all copies reads a small p there while the averages hide it"]


def converged_rule(tol: float, tol_last: Optional[float] = None) -> str:
    """What an inversion's "converged" count means (``core.samplers.InversionInfo.converged``)."""
    if tol_last is None or tol_last == tol:
        return f"every step's residual RMS < {tol:g}"
    return f"every step's residual RMS < its own tolerance: {tol:g}, the last step's (into the data) {tol_last:g}"


def correct_report(summary: dict, labels: dict) -> list:
    """Base vs corrected after ``pgraft correct``, then lines on the inversion and the corrector (print each)."""
    base, inv, info = (summary[k] for k in ("base", "inversion", "corrector"))
    table = metrics_view(
        f"inverse noise correction of {labels['source']} ({labels['base_steps']} base steps, features "
        f"{base['features']}, FID against {summary['fid_data'] or '-'})", "correct", summary)
    lines = [
        f"inversion: {inv['num']} images, {inv['converged']} converged "
        f"({converged_rule(labels['inversion_tol'], labels.get('inversion_tol_last'))}), {inv['dropped']} dropped "
        f"(round-trip RMS > {inv['max_reconstruction_rms']:g} "
        f"per image); network calls per image mean {inv['iterations_mean']:.1f}, max {inv['iterations_max']} "
        f"(cap {inv['iterations_cap']})",
        f"  reconstruction RMS mean {inv['reconstruction_rms_mean']:.4f} (max {inv['reconstruction_rms_max']:.4f}); "
        f"inverted noise mean {inv['noise_mean']:+.3f}, std {inv['noise_std']:.3f} (N(0, I): 0, 1)",
        f"corrector: {info['kind']}, {info['parameters']:,} parameters"
        + (f", final loss {info['final_loss']:.4f}" if info.get("final_loss") else "")
        + (f"; trained in {info['trained_precision']}" if info.get("trained_precision") else "")
        + (f"; fitted to the base in {info['fitted_precision']}" if info.get("fitted_precision") else ""),
    ]
    lines += copy_lines(summary)
    if summary.get("stage_seconds"):
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in summary["stage_seconds"].items())
                     + f"; total {summary['seconds']:.1f} s"
                     + (f" on {summary['device_name']}" if summary.get("device_name") else ""))
    return [table, *lines]


PROVENANCE_CHARS = 240  # the most of one provenance value `pgraft inspect` prints


def inspect_table(model: str, info: dict) -> "Table":  # noqa: F821 - rich.table is imported on use
    """``pgraft inspect``: what a model is, one row per property."""
    import json

    from rich.table import Table

    table = Table(title=f"pgraft inspect {model}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("source", f"{info['source']} ({info['source_kind']})"),
        ("network", info["model_class"]),
        ("family", f"{info['family']} (prediction: {info['prediction_type']})"),
        ("conditioning", info["conditioning"] + (f" ({info['num_classes']} classes)" if info["num_classes"] else "")),
        ("sample shape", " x ".join(map(str, info["sample_shape"])) + (" latent" if info["latent"] else "")),
        ("image shape", " x ".join(map(str, info["image_shape"]))),
        ("parameters", f"{info['parameters']:,}"),
        ("dtype", info["dtype"]),
        ("scheduler", f"{info['scheduler']} (T={info['num_train_timesteps']}"
                      + (f", shift={info['shift']}" if info["shift"] not in (None, 1.0) else "") + ")"),
        ("identity", f"sha256:{info['identity'][:16]}…" if len(info["identity"]) == 64 else info["identity"]),
        ("default data", info["default_data"] or "-"),
        ("default eval data", info["default_eval_data"] or "-"),
    ]
    comp = info.get("composition")
    if comp and comp["kind"] == "finetune":
        lora = comp["lora"]
        rows.append(("fine-tune", f"cutoff {comp['cutoff']} (tuned for t in (c, 1], base for [0, c]); "
                                  + (f"LoRA rank {lora['rank']}" if lora else "full weights")
                                  + f"; tuned segment guidance: {comp['tuned_guidance']}"
                                  + f"; reward {comp['reward']}: {comp['reward_mean']}"))
    elif comp:
        rows.append(("corrector", f"{comp['corrector']} ({comp['corrector_steps']} {comp.get('corrector_sampler', 'euler').capitalize()} steps) -> base at "
                                  f"{comp['base_steps']} Euler steps; fitted to the base in {comp['fitted_precision']}"))
    if comp:
        rows.append(("base identity", f"sha256:{(comp['base_identity'] or '')[:16]}…"))
    for k, v in rows:
        table.add_row(k, str(v))
    prov = info["provenance"]
    if not prov:
        table.add_row("provenance", "none recorded")
    for key, value in sorted((prov or {}).items()):  # one row each, a long value shortened (--json prints them whole)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        table.add_row(f"provenance: {key}", text if len(text) <= PROVENANCE_CHARS else text[:PROVENANCE_CHARS - 1] + "…")
    return table


def status_table(run_dir: object, stages: list) -> "Table":  # noqa: F821 - rich.table is imported on use
    """``pgraft status``: each stage of a run as done, partial (with shard counts), pending or stale."""
    from rich.table import Table

    colours = {"done": "green", "partial": "yellow", "pending": "dim", "stale": "red"}
    table = Table(title=f"run {run_dir}", title_justify="left")
    for col in ("stage", "state", "shards", "key"):
        table.add_column(col)
    for s in stages:
        shards = f"{s.shards_done}/{s.shards_total}" if s.shards_total is not None else str(s.shards_done)
        table.add_row(s.name, f"[{colours.get(s.state, 'white')}]{s.state}[/]", shards, (s.key or "")[:12])
    return table


# ----------------------------------------------------------------------------------------------
# What each verb prints when it is done (its terminal view; --json prints its summary instead)


def wrote_lines(summary: dict) -> list[str]:
    """The file a verb wrote, its run directory, time and report."""
    return [f"[green]wrote[/green] {summary['out']} ({fmt_bytes(summary['out_bytes'])}); run {summary['run_dir']}; "
            f"{summary['seconds']:.0f}s", f"report: {summary['report']}"]


def sample_view(summary: dict) -> list[str]:
    done = summary["num"] - summary["generated_now"]
    return [f"[green]wrote[/green] {summary['num']} images to {summary['out']}"
            f"{f' ({done} already done)' if done else ''} in {summary['seconds']:.1f}s"]


def score_view(summary: dict) -> list[str]:
    return [f"[green]scored[/green] {summary['num']} samples with {summary['reward']}: mean "
            f"{summary['reward_mean']:.4f}, std {summary['reward_std']:.4f}"]


def recipes_table(found: dict) -> "Table":  # noqa: F821 - rich.table is imported on use
    """``pgraft recipes ls``: each bundled recipe and its description."""
    from rich.table import Table

    table = Table(title="recipes (pgraft recipes show NAME; pgraft recipes cp NAME my.toml)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name, description in found.items():
        table.add_row(name, description)
    return table


def gate_lines(results: list, quiet: bool) -> bool:
    """One red stderr line per failed gate (True if any failed); a single note when all held."""
    from .gates import failed as failed_gates

    failed = failed_gates(results)
    for r in failed:
        err.print(Text(r.line, style="bold red"), soft_wrap=True)
    if results and not failed:
        note("gates held: " + ", ".join(r.gate.text for r in results), quiet=quiet)
    return bool(failed)


def evaluate_view(model: str, summary: dict) -> list:
    against = f" against {summary['fid_data']}" if summary.get("fid_data") else ""
    lines: list = [metrics_view(f"evaluate {model}{against} (features {summary['features'] or 'none'})", "evaluate",
                                summary)]
    if summary.get("reward"):
        best = (f"; best of {summary['best_of']} over {summary['groups']} groups: mean {summary['reward_best_of_mean']:.4f}, "
                f"std {summary['reward_best_of_std']:.4f}" if summary.get("best_of") else "")
        lines.append(f"reward {summary['reward']}: mean {summary['reward_mean']:.4f}, std {summary['reward_std']:.4f}{best}")
    return [*lines, f"run {summary['run_dir']}; {summary['seconds']:.0f}s; report: {summary['report']}"]


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` of a refused file operation, with what to check."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = (exc.strerror or str(exc)).lower()
    return f"{paths or 'a file operation'}: {reason}; check the path and its permissions (pgraft --debug shows where)"
