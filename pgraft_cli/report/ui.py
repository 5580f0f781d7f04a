"""Terminal output: a stderr console for humans, stdout for results, progress bars with rate and ETA."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console, Group
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

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
    if not quiet:
        err.print(message)


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
        lines.append(f"reshaped reward rhat = log P(keep | F(r)) of the kept samples: mean {summary['reshaped_reward_mean']:.3f}")
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


def warning_lines(rows: list[tuple[str, dict]]) -> list[Text]:
    """One yellow line per metric warning of each row (e.g. fewer samples than feature dimensions), and
    one plain line per note (e.g. why FID was skipped; a note shared by the rows is printed once)."""
    notes = dict.fromkeys(n for _, r in rows for n in r.get("notes") or [])
    return [*(Text(f"warning ({name}): {w}", style="yellow") for name, r in rows for w in r.get("warnings") or []),
            *(Text(f"note: {n}") for n in notes)]


def finetune_report(summary: dict) -> Group:
    """Base vs tuned after ``pgraft finetune``: reward, FID, cost; then the rounds."""
    from rich.table import Table

    from ..stages.evaluate import COST_NOTE

    table = Table(title=f"{'P-GRAFT' if summary['cutoff'] > 0 else 'GRAFT'} (cutoff {summary['cutoff']}), "
                        f"reward {summary['reward']}", title_justify="left", caption=COST_NOTE, caption_justify="left")
    for col in ("model", "reward mean", "reward std", "FID", "NFE", "GFLOPs/img", "ms/img", "num"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in ("base", "tuned"):
        r = summary[name]
        table.add_row(name, f"{r['reward_mean']:.4f}", f"{r['reward_std']:.4f}",
                      "-" if r.get("fid") is None else f"{r['fid']:.3f}", str(r["nfe"]),
                      f"{r['flops_per_image'] / 1e9:.3f}", f"{1000 * r['seconds_per_image']:.2f}", str(r["num"]))
    rounds = Table(title="rounds", title_justify="left")
    for col in ("round", "sampled reward", "kept", "kept reward", "final loss"):
        rounds.add_column(col, justify="right")
    for h in summary.get("rounds", []):
        loss = h["finetune"].get("final_loss")
        rounds.add_row(str(h["round"]), f"{h['sampled']['reward_mean']:.4f}", str(h["kept"]),
                       f"{h['kept_reward_mean']:.4f}", "-" if loss is None else f"{loss:.4f}")
    return Group(table, *warning_lines([(n, summary[n]) for n in ("base", "tuned")]), rounds)


def metrics_table(title: str, rows: list[tuple[str, dict]]) -> Group:
    """FID (against each reference), KID, NFE, FLOPs and time per image, one row per sampler."""
    from rich.table import Table

    from ..stages.evaluate import COST_NOTE

    table = Table(title=title, title_justify="left", caption=COST_NOTE, caption_justify="left")
    also = list(rows[0][1].get("also_against") or {})  # FID against further data, e.g. the training data
    for col in ("sampler", "FID", *(f"FID vs {name}" for name in also), "KID", "NFE", "GFLOPs/img", "ms/img", "num"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    best = min((r["fid"] for _, r in rows if r.get("fid") is not None), default=None)
    for name, r in rows:
        fid = "-" if r.get("fid") is None else f"{r['fid']:.3f}"
        if r.get("fid") is not None and r["fid"] == best and len(rows) > 1:
            fid = f"[green]{fid}[/green]"
        table.add_row(name, fid, *(f"{r['also_against'][a]['fid']:.3f}" for a in also),
                      "-" if r.get("kid") is None else f"{r['kid']:.4f}", str(r["nfe"]),
                      f"{r['flops_per_image'] / 1e9:.3f}", f"{1000 * r['seconds_per_image']:.2f}", str(r["num"]))
    return Group(table, *warning_lines(rows))


def correct_report(summary: dict, labels: dict) -> list:
    """Base vs corrected after ``pgraft correct``, then lines on the inversion and the corrector (print each)."""
    base, corrected, inv, info = (summary[k] for k in ("base", "corrected", "inversion", "corrector"))
    steps = labels["base_steps"]
    table = metrics_table(
        f"inverse noise correction of {labels['source']} ({steps} base steps, features {base['features']}, "
        f"FID against {summary['fid_data'] or '-'})",
        [(f"base ({steps} steps)", base),
         (f"corrected ({info['kind']}, {labels['corrector_steps']} + {steps} steps)", corrected)])
    lines = [
        f"inversion: {inv['num']} images, {inv['converged']} converged (every step's residual < "
        f"{labels['inversion_tol']:g}), {inv['dropped']} dropped (round-trip RMS > {inv['max_reconstruction_rms']:g} "
        f"per image); network calls per image mean {inv['iterations_mean']:.1f}, max {inv['iterations_max']} "
        f"(cap {inv['iterations_cap']})",
        f"  reconstruction RMS mean {inv['reconstruction_rms_mean']:.4f} (max {inv['reconstruction_rms_max']:.4f}); "
        f"inverted noise mean {inv['noise_mean']:+.3f}, std {inv['noise_std']:.3f} (N(0, I): 0, 1)",
        f"corrector: {info['kind']}, {info['parameters']:,} parameters"
        + (f", final loss {info['final_loss']:.4f}" if info.get("final_loss") else ""),
    ]
    if summary.get("stage_seconds"):
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in summary["stage_seconds"].items())
                     + f"; total {summary['seconds']:.1f} s")
    return [table, *lines]


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
        rows.append(("corrector", f"{comp['corrector']} ({comp['corrector_steps']} steps) -> base at "
                                  f"{comp['base_steps']} Euler steps"))
    if comp:
        rows.append(("base identity", f"sha256:{(comp['base_identity'] or '')[:16]}…"))
    for k, v in rows:
        table.add_row(k, str(v))
    prov = info["provenance"]
    table.add_row("provenance", json.dumps(prov, sort_keys=True)[:400] if prov else "none recorded")
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
