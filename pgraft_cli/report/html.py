"""The report: one self-contained ``report.html`` per run directory.

:func:`render_report` reads the artifacts the run's manifest names (the verb's summary, its sample
stages, the inversion, the cutoff timeline, the recipe, the provenance) and writes a single HTML file a person opens to see what happened: the metric table, sample grids
of base and result from the same seeds, the method's plots (inverse noise: FID against FLOPs,
inversion error, inverted-noise statistics; GRAFT / P-GRAFT: reward histograms before and after
filtering, the rule's reshaped reward, reward and FID per round, the cutoff on the sampler's time
grid) and the provenance. Images are inline PNGs (matplotlib's Agg renderer, PIL for grids); the
page needs no network and no JavaScript.

The run store records the artifacts and ``provenance.json`` (device, total time, command line) when
a verb finishes, so ``pgraft report RUN`` re-renders the same page; the report writes nothing else.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from ..core.metrics import COPY_CELL_MIN_HELDOUT, COPY_CELL_MIN_SAMPLES
from ..errors import PgraftError
from ..io.runstore import MANIFEST, REPORT, RunStore, atomic_write_text, versions
from .metrics import MetricsTable, cell_tests, copy_tests, metrics_table_of, rounds_table_of
from .ui import converged_rule, fmt_bytes, stopped_line

GRID_IMAGES = 32  # images per sample grid (the first indices, the same seeds for base and result)
PROMPT_ROWS = 8  # rows of the prompt table of text models


# ----------------------------------------------------------------------------------------------
# What the run holds


def _json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# Pictures


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(width: float = 6.4, height: float = 3.6, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid_png(images: np.ndarray, cols: int = 8, cell: int = 64) -> bytes:
    """uint8 images (N, H, W, C) as one PNG grid, each cell about ``cell`` pixels (nearest for small)."""
    from PIL import Image

    n, h, w, c = images.shape
    scale = max(1, cell // max(h, w)) if max(h, w) < cell else 1
    if max(h, w) > 4 * cell:  # big images: shrink, a grid is an overview
        scale = 0
    tile = (w * scale, h * scale) if scale else (4 * cell * w // max(h, w), 4 * cell * h // max(h, w))
    rows = math.ceil(n / cols)
    pad = 2
    canvas = Image.new("RGB", (cols * (tile[0] + pad) + pad, rows * (tile[1] + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        pic = Image.fromarray(img[:, :, 0] if c == 1 else img).convert("RGB")
        pic = pic.resize(tile, Image.NEAREST if scale else Image.LANCZOS)
        canvas.paste(pic, (pad + (i % cols) * (tile[0] + pad), pad + (i // cols) * (tile[1] + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _stage_images(run_dir: Path, stage: str, limit: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The first ``limit`` images of a sample stage: (index, images uint8 NHWC, prompt_index or None)."""
    from safetensors import safe_open

    idx, imgs, prompts = [], [], []
    for path in RunStore(run_dir, is_main=False).stage(stage).paths():
        with safe_open(str(path), "np") as f:
            keys = set(f.keys())
            if not {"index", "images"} <= keys:  # a stage of other tensors (scores, inverted noise ...)
                break
            idx.append(f.get_tensor("index"))
            imgs.append(f.get_tensor("images"))
            if "prompt_index" in keys:
                prompts.append(f.get_tensor("prompt_index"))
        if sum(len(i) for i in idx) >= limit:
            break
    if not idx:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 1, 1, 1), dtype=np.uint8), None
    index = np.concatenate(idx)
    order = np.argsort(index, kind="stable")[:limit]
    prompt_index = np.concatenate(prompts)[order] if prompts else None
    return index[order], np.concatenate(imgs)[order], prompt_index


# ----------------------------------------------------------------------------------------------
# HTML pieces

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;color:#1b1f24}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}.sub{color:#57606a;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border:1px solid #d0d7de;padding:4px 9px;text-align:right}
th{background:#f6f8fa}td.l,th.l{text-align:left}tr.delta td{color:#57606a;font-style:italic}
tr.delta td.good{color:#1a7f37;font-weight:600}tr.delta td.bad{color:#cf222e;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}figure{margin:0}figcaption{color:#57606a;font-size:13px;margin:4px 0}
img{max-width:100%;image-rendering:pixelated}img.plot{image-rendering:auto}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px 10px;overflow:auto;font-size:12px;max-height:420px}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:6px 0}dl.kv dt{font-weight:600}dl.kv dd{margin:0;word-break:break-all}
.note{color:#57606a;font-size:13px}p.note.bad{color:#9a6700}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(data: bytes, alt: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{_e(alt)}" src="{_png_uri(data)}">'


def _plot(fig: Any, alt: str, caption: str) -> str:
    return f"<figure>{_img(_fig_png(fig), alt, 'plot')}<figcaption>{_e(caption)}</figcaption></figure>"


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs if v is not None)
    return f'<dl class="kv">{rows}</dl>'


_NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*(e[+-]?\d+)?|-)$")


def _table(header: list[str], rows: list[list[Any]], attrs: str = "") -> str:
    """A plain table: numbers right-aligned, text left-aligned."""
    def cell(c: Any) -> str:
        return f'<td{"" if _NUMBER.match(str(c)) else " class=l"}>{_e(c)}</td>'

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_html(model: MetricsTable, table_id: str = "metrics", first: str = "model",
                  note: Optional[str] = None) -> str:
    """A metrics table (``report.metrics``, as the terminal shows it): one row per sampler (or round;
    ``data-row``), one cell per metric (``data-metric``), then ``note`` (default: how cost is measured).

    Each cell holds the formatted value and its exact value in ``data-value``; with two rows compared,
    a third gives the change, coloured by whether it went the better way.
    """
    from ..stages.evaluate import COST_NOTE

    note = COST_NOTE if note is None else note
    head = f'<th class="l">{_e(first)}</th>' + "".join(f"<th>{_e(c.header)}</th>" for c in model.columns)
    body = []
    for row in model.rows:
        cells = "".join(f'<td data-metric="{_e(c.key)}" data-value="{_e(json.dumps(row.get(c.key)))}">'
                        f"{_e(model.cell(row, c))}</td>" for c in model.columns)
        body.append(f'<tr data-row="{_e(row.id)}"><td class="l">{_e(row.label)}</td>{cells}</tr>')
    change = model.change()
    if change:
        css = {True: "good", False: "bad", None: ""}
        cells = "".join(f'<td class="{css[b]}">{_e(t)}</td>' if t else "<td></td>" for t, b in change)
        body.append(f'<tr class="delta"><td class="l">change</td>{cells}</tr>')
    warnings = "".join(f'<p class="note bad" data-warning="{_e(row.id)}">warning ({_e(row.label)}): {_e(w)}</p>'
                       for row, w in model.warnings())
    warnings += "".join(f'<p class="note">note: {_e(n)}</p>' for n in model.notes())
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f"{note_html}{warnings}")


def _grids(run_dir: Path, pairs: list[tuple[str, str]]) -> str:
    """Sample grids side by side (the same indices, so the same seeds), or a prompt table for text models."""
    loaded = [(label, stage, *_stage_images(run_dir, stage, GRID_IMAGES)) for label, stage in pairs
              if (run_dir / stage).is_dir()]
    loaded = [x for x in loaded if len(x[2])]
    if not loaded:
        return '<p class="note">no sample images in this run directory</p>'
    common = set(loaded[0][2].tolist())
    for x in loaded[1:]:
        common &= set(x[2].tolist())
    from ..stages.score import sample_prompts

    prompts = sample_prompts(run_dir, loaded[0][1])
    seed = (_json(run_dir / loaded[0][1] / "settings.json") or {}).get("seed")
    seed_note = f"seed {seed}, images {min(common)}..{max(common)}" if common else ""
    if prompts:
        rows = []
        for i in sorted(common)[:PROMPT_ROWS]:
            cells = []
            for _, _, index, images, _ in loaded:
                j = int(np.nonzero(index == i)[0][0])
                cells.append(f"<td>{_img(_grid_png(images[j:j + 1], cols=1, cell=128), f'image {i}')}</td>")
            _, _, index, _, prompt_index = loaded[0]  # the same index has the same prompt in every stage
            j = int(np.nonzero(index == i)[0][0])
            p = prompts[int(prompt_index[j])] if prompt_index is not None else prompts[i % len(prompts)]
            rows.append(f'<tr><td>{i}</td><td class="l">{_e(p)}</td>{"".join(cells)}</tr>')
        head = "".join(f"<th>{_e(label)}</th>" for label, *_ in loaded)
        return (f'<p class="note">{_e(seed_note)}</p><table class="prompts"><thead><tr><th>#</th>'
                f'<th class="l">prompt</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    figs = []
    for label, stage, index, images, _ in loaded:
        keep = np.isin(index, sorted(common))
        figs.append(f"<figure>{_img(_grid_png(images[keep]), f'{label} samples')}"
                    f"<figcaption>{_e(label)} ({_e(stage)}; {int(keep.sum())} images)</figcaption></figure>")
    return f'<p class="note">{_e(seed_note)}: the same starting noise in every grid</p><div class="row">{"".join(figs)}</div>'


def _loss_plot(curves: list[tuple[str, list[float], int]], title: str) -> str:
    curves = [c for c in curves if c[1]]
    if not curves:
        return ""
    fig, ax = _figure(5.2, 3.2)
    for label, losses, steps in curves:
        x = np.arange(len(losses)) * (max(steps, len(losses)) / len(losses))
        ax.plot(x, losses, label=label, lw=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    return _plot(fig, title, f"{title} (as logged; subsampled for long runs)")


# ----------------------------------------------------------------------------------------------
# Inverse noise correction


def _correct_sections(run_dir: Path, s: dict[str, Any], recipe: dict[str, Any], inversion: str) -> list[tuple[str, str]]:
    base, corr, inv = s["base"], s["corrected"], s.get("inversion") or {}
    sections = []

    # FID against FLOPs per image
    fig, ax = _figure(5.2, 3.6)
    pts = [("base", base, "#57606a", "o"), ("corrected", corr, "#0969da", "s")]
    plotted = False
    for label, m, colour, marker in pts:
        if m.get("fid") is None:
            continue
        plotted = True
        ax.scatter([m["flops_per_image"] / 1e9], [m["fid"]], color=colour, marker=marker, s=60, zorder=3,
                   label=f"{label}: {m['nfe']} NFE")
        ax.annotate(f"  {label}\n  FID {m['fid']:.2f}", (m["flops_per_image"] / 1e9, m["fid"]), fontsize=8)
    if plotted:
        ax.set_xlabel("GFLOPs per image (measured)")
        ax.set_ylabel(f"FID ({base.get('features') or 'features'})")
        ax.set_title("FID against FLOPs per image")
        ax.margins(0.35)
        ax.legend(loc="best", fontsize=8)
        fid_plot = _plot(fig, "FID against FLOPs per image",
                         "lower left is better: the corrector is worth its FLOPs when its point lies below the base "
                         "sampler's at similar cost")
    else:
        fid_plot = '<p class="note">no FID was measured (no reference data)</p>'
    sections.append(("FID against FLOPs", f'<div class="row">{fid_plot}</div>'))

    # Inversion: per-image reconstruction RMS, and the inverted noise against N(0, I)
    rms, noise = _inversion_arrays(run_dir, inversion)
    plots = []
    limit = (recipe.get("correct") or {}).get("max_reconstruction_rms")
    if rms is not None and len(rms):
        fig, ax = _figure(4.8, 3.4)
        ax.hist(rms, bins=min(30, max(5, len(rms) // 4)), color="#0969da", alpha=0.8)
        if limit:
            ax.axvline(limit, color="#cf222e", ls="--", label=f"limit {limit:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel("RMS of T(T^-1(x)) - x per image")
        ax.set_ylabel("images")
        ax.set_title("inversion reconstruction error")
        plots.append(_plot(fig, "inversion reconstruction error",
                           "per-image round-trip error of the inverted sampler; images right of the limit are dropped"))
    histogram = inv.get("iterations_histogram") or {}
    if histogram:
        fig, ax = _figure(4.8, 3.4)
        ax.bar([int(k) for k in histogram], list(histogram.values()), color="#0969da", alpha=0.8)
        ax.set_xlabel("network calls per image (all steps)")
        ax.set_ylabel("images")
        ax.set_title(f"inversion iterations (cap {inv.get('iterations_cap', '-')})")
        plots.append(_plot(fig, "inversion iterations", "each image stops on its own fixed-point residual"))
    if noise is not None and noise.size:
        fig, (ax1, ax2) = _figure(8.4, 3.4, ncols=2)
        values = noise.reshape(-1)[:: max(1, noise.size // 2_000_000)]  # large latents: a strided subset
        ax1.hist(values, bins=80, density=True, color="#8250df", alpha=0.7, label="inverted noise")
        grid = np.linspace(-4.5, 4.5, 300)
        ax1.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), color="black", lw=1.2, label="N(0, 1)")
        ax1.set_xlim(-4.5, 4.5)
        ax1.set_xlabel("value (all coordinates)")
        ax1.set_title("inverted noise against N(0, I)")
        ax1.legend(fontsize=8)
        dim = noise[0].size
        norms = np.sqrt((noise.reshape(len(noise), -1) ** 2).sum(1) / dim)
        ax2.hist(norms, bins=min(30, max(5, len(norms) // 4)), color="#8250df", alpha=0.7)
        ax2.axvline(1.0, color="black", lw=1.2, label="N(0, I): 1")
        ax2.set_xlabel("||z|| / sqrt(D) per image")
        ax2.set_title("norm of each inverted noise")
        ax2.legend(fontsize=8)
        plots.append(_plot(fig, "inverted noise statistics",
                           "the distribution the corrector learns to produce; N(0, I) would match the black lines"))
    tol, tol_last = ((recipe.get("correct") or {}).get(k) for k in ("inversion_tol", "inversion_tol_last"))
    fraction = (recipe.get("correct") or {}).get("max_dropped_fraction")
    stats = _table(["statistic", "value", "reference"], [
        ["images inverted", inv.get("num", "-"), "-"],
        ["converged", inv.get("converged", "-"), converged_rule(tol, tol_last) if tol else "-"],
        ["dropped from training", inv.get("dropped", "-"),
         f"per image: round-trip RMS > {limit:g}; fails above {fraction:g} of the images" if limit and fraction is not None else "-"],
        ["network calls per image, mean", _f(inv.get("iterations_mean"), 1), f"cap {inv.get('iterations_cap', '-')}"],
        ["network calls per image, max", inv.get("iterations_max", "-"), f"cap {inv.get('iterations_cap', '-')}"],
        ["reconstruction RMS mean", _f(inv.get("reconstruction_rms_mean")), "-"],
        ["reconstruction RMS max", _f(inv.get("reconstruction_rms_max")), "-"],
        ["reconstruction |error| max", _f(inv.get("reconstruction_abs_max")), "-"],
        ["noise mean (kept images)", _f(inv.get("noise_mean")), "N(0, I): 0"],
        ["noise std", _f(inv.get("noise_std")), "N(0, I): 1"],
        ["noise norm / sqrt(D), mean", _f(inv.get("noise_norm_mean")), "N(0, I): 1"],
    ], ' id="inversion"')
    sections.append(("Inversion", stats + f'<div class="row">{"".join(plots)}</div>'))

    info = s.get("corrector") or {}
    steps = (recipe.get("correct") or {}).get("corrector_train_steps") or len(s.get("loss_curve") or [])
    corrector = _kv([("corrector", info.get("kind")), ("parameters", f"{info['parameters']:,}" if info.get("parameters") else None),
                     ("final loss", _f(info.get("final_loss"))), ("base steps", corr.get("steps")),
                     ("trained in", info.get("trained_precision")), ("fitted to the base in", info.get("fitted_precision")),
                     ("corrector network calls", (corr.get("nfe") or 0) - (corr.get("steps") or 0) or None)])
    sections.append(("Corrector", corrector + _loss_plot([("corrector", s.get("loss_curve") or [], steps)],
                                                         "corrector flow-matching loss")))
    copying = _copying_html(s)
    if copying:
        sections.append(("Data copying", copying))
    return sections


def _copying_html(s: dict[str, Any]) -> str:
    """The data-copying test of the base and corrected samples (``stages.evaluate.copying``), a table."""
    tests = copy_tests(s)
    if not tests:
        return ""
    c0 = tests[-1][1]
    q = f"{c0['near_quantile'] * 100:g}th"
    null = c0.get("near_null", c0["near_quantile"])
    rows = [[name, _f(c["auc"], 3), f"{c['z']:+.2f}", f"{c['near']:.1%}", f"{c['median']:.4g}", f"{c['min']:.4g}"]
            for name, c in tests]
    rows.append([f"held-out images ({s.get('fid_data')}; the reference)", "0.500", "+0.00",
                 f"{null:.1%}" + (f" +- {c0['near_null_se']:.1%}" if c0.get("near_null_se") else "") + " (drawn alike)",
                 f"{c0['heldout_median']:.4g}", f"{c0['heldout_min']:.4g}"])
    note = (f'<p class="note">Meehan, Chaudhuri and Dasgupta\'s data-copying test (AISTATS 2020), global form, in the '
            f'FID features ({_e(s["corrected"].get("features"))}): the distance of each of {c0["num"]} samples to its '
            f'nearest of the {c0["num_train"]} {_e(c0["train"])} images, against the same distance for the '
            f'{c0["num_heldout"]} held-out images. AUC: the chance that a sample lies farther than a held-out image '
            f'(Mann-Whitney; Z its normal score, which grows with the counts). 0.5: as far as unseen images; below: '
            f'nearer, as copies would be, or bunched where the training images are dense; above: farther. The test is '
            f'global: samples otherwise farther than unseen images hide a share of copies from the AUC; the share '
            f'below the held-out {q} percentile rises with them sooner (its expectation and sampling error for '
            f'samples drawn like the held-out images in the last row). The minimum distances are not comparable as '
            f'they stand: the least of {c0["num"]} draws falls below the least of {c0["num_heldout"]} drawn alike with '
            f'probability {c0["num"] / (c0["num"] + c0["num_heldout"]):.2f}.</p>')
    table = _table(["samples", "AUC", "Z", f"below the held-out {q} percentile", "median distance", "min distance"],
                   rows, ' id="copying"')
    cells = cell_tests(tests)
    if cells:
        table += _table(["samples", "C_T", "lowest cell's Z", "its p (Bonferroni)", "cells used"],
                        [[name, f"{c['c_t']:+.2f}", f"{c['z_min']:+.2f}", f"{c['p_min']:.2g}", f"{c['cells_used']} of {c['cells']}"]
                         for name, c in cells], ' id="copying-cells"')
        note += (f'<p class="note">Cell-wise: the paper\'s C_T over the k-means cells of the {_e(c0["train"])} images '
                 f'(cells with more than {COPY_CELL_MIN_SAMPLES} samples and at least {COPY_CELL_MIN_HELDOUT} held-out '
                 f'images): each cell\'s Z of its samples\' distances to '
                 f'its nearest training image in the cell against its held-out images\', weighted by the cell\'s share '
                 f'of the held-out images. A sampler that copies in one region while it under-fits elsewhere can read '
                 f'a positive C_T and global Z; the lowest cell\'s p, corrected for the number of cells used, shows it where '
                 f'(nearly) all of a cell\'s samples are copies. A sampler sharper than the data (samples bunched where '
                 f'the training images are dense) lowers it too.</p>')
    return table + note


def _inversion_arrays(run_dir: Path, stage: str) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    from safetensors import safe_open

    rms, noise = [], []
    for path in RunStore(run_dir, is_main=False).stage(stage).paths():
        with safe_open(str(path), "np") as f:
            keys = set(f.keys())
            if "rms" in keys:
                rms.append(f.get_tensor("rms"))
            if "noise" in keys and sum(len(n) for n in noise) < 512:  # enough for the histograms
                noise.append(f.get_tensor("noise"))
    return (np.concatenate(rms) if rms else None), (np.concatenate(noise) if noise else None)


def _f(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


# ----------------------------------------------------------------------------------------------
# GRAFT / P-GRAFT


def _finetune_sections(s: dict[str, Any], timeline: Optional[dict[str, Any]]) -> list[tuple[str, str]]:
    sections = []
    history = s.get("history") or []
    filters = [(h["round"], h["filter"]) for h in history if h.get("filter")]

    # reward histograms before and after filtering, one panel per round
    if filters:
        fig, axes = _figure(min(4.2 * len(filters), 12.6), 3.2, ncols=len(filters))
        axes = np.atleast_1d(axes)
        for ax, (r, f) in zip(axes, filters):
            edges = np.asarray(f["histogram_edges"], dtype=float)
            widths = np.diff(edges)
            ax.bar(edges[:-1], f["histogram_before"], width=widths, align="edge", color="#afb8c1", label="sampled")
            ax.bar(edges[:-1], f["histogram_after"], width=widths, align="edge", color="#1a7f37", alpha=0.85,
                   label="kept")
            ax.set_title(f"round {r}: kept {f['kept']} of {f['num']}")
            ax.set_xlabel(f"reward ({s.get('reward', '')})")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("samples")
        rows = [[r, f["rule"], json.dumps(f.get("params")), f["num"], f["kept"],
                 _f((f.get("reward_before") or {}).get("mean")), _f((f.get("reward_after") or {}).get("mean")),
                 _f(f.get("reshaped_reward_mean"), 3)] for r, f in filters]
        table = _table(["round", "rule", "params", "sampled", "kept", "reward sampled", "reward kept",
                        "mean rhat of kept"], rows, ' id="filter"')
        sections.append(("Filtering", table + _plot(fig, "reward histograms before and after filtering",
                                                    "rewards of every sample (grey) and of those the rule kept (green)")))

        # the reshaped reward of the rule: rhat(F) = log g(F), with the kept samples on it
        from ..core.selection import reshaped_reward

        r0, f0 = filters[-1]
        acc = f0["acceptance"]
        F = np.linspace(1e-4, 1 - 1e-4, 400)
        rhat = reshaped_reward(f0["rule"], F, **acc).numpy()
        fig, (ax1, ax2) = _figure(8.8, 3.4, ncols=2)
        finite = np.isfinite(rhat)
        cdf, kept_rhat = f0.get("cdf") or [], f0.get("reshaped_reward") or []
        kept_finite = [v for v in kept_rhat if v is not None]
        floor = min(-8.0, min(kept_finite, default=0.0) - 1.0)  # rhat -> -inf as F -> 0: show the useful range
        ax1.plot(F, np.where(finite, rhat, floor), color="#0969da", lw=1.6, label=f"{f0['rule']} {acc}")
        if cdf and kept_rhat:
            y = np.array([floor if v is None else v for v in kept_rhat], dtype=float)
            ax1.scatter(cdf, y, s=10, color="#1a7f37", zorder=3, label=f"kept samples (round {r0})")
        ax1.set_ylim(floor, 0.5)
        ax1.set_xlabel("F(r): reward CDF under the sampling model")
        ax1.set_ylabel("rhat = log P(keep | F)")
        ax1.set_title("reshaped reward of the rule")
        ax1.legend(fontsize=8)
        ax2.plot(F, np.exp(rhat), color="#0969da", lw=1.6)
        ax2.set_xlabel("F(r)")
        ax2.set_ylabel("g(F) = P(keep | F)")
        ax2.set_title("acceptance probability")
        ax2.set_ylim(-0.03, 1.03)
        sections.append(("Reshaped reward", _plot(
            fig, "reshaped reward curve",
            "the tilt the rule applies: kept samples follow p(x) exp(rhat(x)) (GRAFT, arXiv 2510.02692)")))

    # reward and FID per round
    base, tuned = s.get("base") or {}, s.get("tuned") or {}
    rounds = s.get("rounds") or []
    if rounds or base:
        judges = list(s.get("judges") or {})
        diverse = any(r.get("pairwise_distance") is not None for r in rounds)
        third = bool(judges or diverse)
        fig, axes = _figure(13.2 if third else 8.8, 3.4, ncols=3 if third else 2)
        ax1, ax2 = axes[0], axes[1]
        n = len(rounds)
        xs = [r["round"] - 1 for r in rounds]
        last = (s.get("stopped") or {}).get("rounds_kept", n)  # the rounds the tuned model had
        if rounds:
            ax1.plot(xs, [r["sampled"]["reward_mean"] for r in rounds], "o-", color="#57606a",
                     label="sampled (model entering the round)")
            ax1.plot(xs, [_nan(r.get("kept_reward_mean")) for r in rounds], "^--", color="#1a7f37",
                     label="kept by the filter")
        if base.get("reward_mean") is not None:
            ax1.scatter([0, last], [base["reward_mean"], tuned.get("reward_mean")], marker="s", s=50, color="#0969da",
                        zorder=3, label="evaluated: base, tuned")
        ax1.set_xlabel("rounds of fine-tuning done")
        ax1.set_ylabel("reward mean")
        ax1.set_title("reward per round")
        ax1.legend(fontsize=7)
        # two protocols, kept apart as in the reward plot: each round's own samples (its seed, sample.num),
        # and the evaluations of base and tuned (evaluate.seed, evaluate.num)
        fids = [(r["round"] - 1, r["fid"]) for r in rounds if r.get("fid") is not None]
        evaluated = [(x, m["fid"]) for x, m in ((0, base), (last, tuned)) if m.get("fid") is not None]
        if fids:
            ax2.plot(*zip(*fids), "o-", color="#57606a", label="sampled (model entering the round)")
        if evaluated:
            ax2.scatter(*zip(*evaluated), marker="s", s=50, color="#0969da", zorder=3, label="evaluated: base, tuned")
        if fids or evaluated:
            ax2.set_ylabel(f"FID ({base.get('features') or ''})")
            ax2.legend(fontsize=7)
        else:
            ax2.text(0.5, 0.5, "no FID measured\n(no reference data)", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel("rounds of fine-tuning done")
        ax2.set_title("FID per round")
        if third:  # the guards against reward hacking: judges never optimised, and diversity
            ax3 = axes[2]
            for name in judges:
                ax3.plot(xs, [_nan(r.get("judges", {}).get(name)) for r in rounds], "o-", label=f"judge.{name}")
            ax3.set_ylabel("judge mean")
            if diverse:
                twin = ax3.twinx()
                twin.plot(xs, [_nan(r.get("pairwise_distance")) for r in rounds], "d:", color="#8250df",
                          label="diversity")
                twin.set_ylabel("pairwise distance", color="#8250df")
                ax3.plot([], [], "d:", color="#8250df", label="diversity (right axis)")
            ax3.set_xlabel("rounds of fine-tuning done")
            ax3.set_title("judges and diversity per round")
            ax3.legend(fontsize=7)
        for ax in axes:
            ax.set_xticks(range(n + 1))
        table = _metrics_html(rounds_table_of(s), "rounds", "round", note="") if rounds else ""
        if s.get("stopped"):
            table += f'<p class="note bad" id="stopped">{_e(stopped_line(s["stopped"]))}</p>'
        sections.append(("Rounds", table + _plot(
            fig, "reward, judges, FID and diversity per round",
            "round r samples from the model after r - 1 rounds: the training reward, the judges (never optimised), "
            "FID and pairwise distance (within a prompt or class) of those samples; evaluated base before round 1, tuned after the last")))

    # the cutoff on the sampler's time grid
    if timeline:
        sections.append(("Cutoff", _cutoff_timeline(timeline)))
    losses = [(f"round {h['round']}", h.get("loss_curve") or [], (h.get("finetune") or {}).get("steps") or 0)
              for h in history]
    loss = _loss_plot(losses, "fine-tuning loss")
    if loss:
        sections.append(("Fine-tuning", loss))
    return sections


def _cutoff_timeline(t: dict[str, Any]) -> str:
    """The sampler's grid with the steps of the fine-tuned model marked (the run's ``timeline`` artifact)."""
    cutoff, steps = t["cutoff"], t["steps"]
    grid, above = np.asarray(t["grid"], dtype=float), np.asarray(t["tuned"], dtype=bool)
    tuned_steps = int(above[:-1].sum())
    fig, ax = _figure(9.0, 1.9)
    for k in range(steps):
        colour = "#8250df" if above[k] else "#57606a"
        ax.plot([grid[k], grid[k + 1]], [0, 0], color=colour, lw=7, solid_capstyle="butt")
    ax.scatter(grid, np.zeros_like(grid), color="white", edgecolor="black", zorder=3, s=22)
    if cutoff > 0:
        ax.axvline(cutoff, color="#cf222e", lw=2)
        ax.annotate(f"cutoff c = {cutoff:g}", (cutoff, 0.42), color="#cf222e", ha="center", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.annotate(f"fine-tuned model: {tuned_steps} steps, t in (c, 1]", (1.0, -0.55), color="#8250df", fontsize=9)
    ax.annotate(f"base model: {steps - tuned_steps} steps, t in [0, c]", (0.0, -0.55), color="#57606a", fontsize=9,
                ha="right")
    ax.set_xlim(1.02, -0.02)  # noise on the left, data on the right: the order the sampler walks
    ax.set_ylim(-0.8, 0.7)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("t (1 = noise, 0 = data)")
    ax.set_title(f"the sampler's {steps}-step {t['name']} grid and the hand-over")
    return _plot(fig, "cutoff on the sampler timeline",
                 f"{'P-GRAFT' if cutoff > 0 else 'GRAFT'}: each step from t_k uses the fine-tuned model when t_k > c, "
                 f"the base model otherwise")


# ----------------------------------------------------------------------------------------------
# Provenance


def _provenance_section(run_dir: Path, manifest: dict[str, Any], entry: dict[str, Any], kind: str,
                        recipe_path: Optional[Path]) -> str:
    parts = []
    vers = entry.get("versions")
    note = ""
    if not vers:
        vers = versions()
        note = '<p class="note">no provenance.json in this run: versions are those installed when this page was rendered</p>'
    parts.append("<h3>environment</h3>" + note + _kv(
        [("command", entry.get("command")), ("finished", entry.get("finished")),
         ("device", (entry.get("device") or "-") + (f" ({entry['device_name']})" if entry.get("device_name") else "")),
         ("platform", entry.get("platform")), ("pgraft (run manifest)", manifest.get("pgraft_version"))]
        + [(k, v) for k, v in vers.items() if v]))

    hashes: dict[str, list[str]] = {}
    for name, st in manifest["stages"].items():
        for key in ("model", "base"):
            ident = (st.get("inputs") or {}).get(key)
            if ident:
                hashes.setdefault(str(ident), []).append(name)
    rows = [[ident, ", ".join(stages)] for ident, stages in hashes.items()]
    if entry.get("out_sha256"):
        rows.append([entry["out_sha256"], f"output checkpoint {entry.get('out')} ({fmt_bytes(entry.get('out_bytes'))})"])
    parts.append("<h3>models</h3>" + _table(["identity (sha256)", "used by"], rows, ' id="hashes"'))

    seeds = []
    for name, st in manifest["stages"].items():
        cfg = st.get("config") or {}
        if "seed" in cfg:
            seeds.append([name, cfg.get("seed"), cfg.get("steps", "-"), cfg.get("num", "-")])
    if seeds:
        parts.append("<h3>seeds</h3>" + _table(["stage", "seed", "steps", "num"], seeds, ' id="seeds"'))

    stage_rows, total = [], 0.0
    for name, st in sorted(manifest["stages"].items(), key=lambda kv: kv[1].get("started", 0)):
        secs = st.get("seconds")
        total += secs or 0.0
        stage_rows.append([name, st.get("status", "-"), "-" if secs is None else f"{secs:.2f}",
                           str(st.get("key", ""))[:12]])
    stage_rows.append(["all stages", "", f"{total:.2f}", ""])
    if entry.get("seconds") is not None:
        stage_rows.append([f"whole command ({entry.get('verb', kind)})", "", f"{float(entry['seconds']):.2f}", ""])
    parts.append("<h3>time per stage</h3>" + _table(["stage", "status", "seconds", "key"], stage_rows, ' id="stages"'))

    if recipe_path is not None and recipe_path.is_file():
        parts.append(f"<h3>resolved recipe ({_e(recipe_path.name)})</h3><pre>{_e(recipe_path.read_text())}</pre>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# The page


def _recipe_dict(path: Optional[Path]) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    from ..io.recipes import tomllib

    try:
        return tomllib.loads(path.read_text())
    except Exception:  # a damaged recipe still gets a report, without recipe-derived details
        return {}


def render_report(run_dir: Path | str) -> Path:
    """Write ``RUN/report.html`` from the artifacts the run's manifest names; returns its path.

    A run no verb has finished yet (interrupted, or sampled by an older pgraft) shows the images of
    its stages and its provenance.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise PgraftError(f"{run_dir} is not a pgraft run directory (no {MANIFEST}); pass the --run-dir of a run")
    store = RunStore(run_dir, is_main=False)
    manifest = store.read_manifest()
    verb, artifacts = store.artifacts()
    s = store.read_artifact("summary") or {}
    kind = verb if verb == "sample" or (verb and s) else "sample"  # a summary gone (a stage re-run): its stages
    prov = store.read_provenance()
    entry = prov.get(kind) or (next(iter(prov.values())) if prov else {})
    recipe_path = run_dir / artifacts["recipe"] if "recipe" in artifacts else None
    pairs = [tuple(p) for p in artifacts.get("samples") or [(name, name) for name in manifest["stages"]]]

    sections: list[tuple[str, str]] = []
    facts: list[tuple[str, Any]] = [("run directory", str(run_dir.resolve()))]
    if kind == "correct":
        base_steps = s["base"].get("steps")
        title = f"Inverse noise correction ({base_steps} base steps)"
        facts += [("data", s.get("data")), ("FID against", s.get("fid_data")), ("FID features", s["base"].get("features"))]
        sections += _correct_sections(run_dir, s, _recipe_dict(recipe_path), artifacts["inversion"])
    elif kind == "finetune":
        cutoff = s["cutoff"]
        title = f"{'P-GRAFT' if cutoff > 0 else 'GRAFT'} fine-tuning (cutoff {cutoff:g})"
        facts += [("reward", s.get("reward")),
                  ("judges", ", ".join(f"{k} = {v}" for k, v in (s.get("judges") or {}).items()) or None),
                  ("rounds", len(s.get("rounds") or [])), ("data", s.get("data")), ("FID against", s.get("fid_data")),
                  ("FID features", s["base"].get("features"))]
        sections += _finetune_sections(s, store.read_artifact("timeline"))
    elif kind == "evaluate":
        title = f"Evaluation of {s.get('model', '')}"
        facts += [("model", s.get("model")), ("data", s.get("data")), ("FID against", s.get("fid_data")),
                  ("FID features", s.get("features")),
                  ("reward", s.get("reward"))]
    else:
        settings = store.read_artifact("settings") or {}
        title = "Samples"
        facts += [("steps", settings.get("steps")), ("seed", settings.get("seed")), ("num", settings.get("num"))]
    out = artifacts.get("checkpoint")
    if out:
        size = entry.get("out_bytes") or (Path(out).stat().st_size if Path(out).is_file() else None)
        facts.append(("output checkpoint", f"{out} ({fmt_bytes(size)})"))
    if entry.get("seconds") is not None:
        facts.append(("time taken", f"{float(entry['seconds']):.1f} s"))
    facts.append(("device", entry.get("device")))

    body = [f"<h1>{_e(title)}</h1><p class=\"sub\">pgraft report of {_e(run_dir.name)}, rendered "
            f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>", _kv(facts)]
    model = metrics_table_of(kind, s) if s else None
    if model is not None:
        body.append("<h2>Metrics</h2>" + _metrics_html(model))
    body.append("<h2>Samples</h2>" + _grids(run_dir, pairs))
    for heading, content in sections:
        body.append(f"<h2>{_e(heading)}</h2>{content}")
    body.append("<h2>Provenance</h2>" + _provenance_section(run_dir, manifest, entry, kind, recipe_path))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)} · pgraft</title><style>{_CSS}</style></head>"
            f'<body>{"".join(body)}</body></html>\n')
    path = run_dir / REPORT
    atomic_write_text(path, page)
    return path
