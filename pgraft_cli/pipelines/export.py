"""``pgraft export``: a checkpoint as files diffusers, ComfyUI or A1111 read without pgraft."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .skeleton import LoadOptions, Options, Outcome, check_out_spares_inputs, load, recorded_bases, resolve_recipe

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ExportOptions(Options, LoadOptions):
    """What ``pgraft export`` takes besides CHECKPOINT and --out."""

    format: str = "diffusers"
    lora_format: str = "diffusers"
    keep_adapter: bool = False
    force: bool = False
    base: Optional[str] = None
    dtype: Optional[str] = None  # the written weights' dtype; None: the recipe's model.dtype (float32)


def export(checkpoint: str, out: Path, o: ExportOptions) -> Outcome:
    """Check the format against the checkpoint, write everything into a fresh folder, move it onto ``out``;
    the summary lists the files written (``files``, relative to ``out``)."""
    import torch

    from ..io.export import FORMATS, ExportError, export_diffusers, export_lora, export_single_file, output_folder

    if o.format not in FORMATS:
        raise ExportError(f"--format {o.format!r} is unknown; use one of {', '.join(FORMATS)}")
    if o.lora_format != "diffusers" and o.format != "lora":
        raise ExportError("--lora-format applies to --format lora only; drop it or pass --format lora")
    if o.keep_adapter and o.format != "diffusers":
        raise ExportError("--keep-adapter applies to --format diffusers only; drop it")
    if o.dtype not in (None, *DTYPES):
        raise ExportError(f"--dtype {o.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    check_out_spares_inputs(out, {"CHECKPOINT": checkpoint, "--config": o.config, "--base": o.base,
                                  **recorded_bases(checkpoint, "CHECKPOINT")}, folder=True)
    recipe = resolve_recipe(o.recipe, o.sets)
    dtype = getattr(torch, o.dtype or recipe.model.dtype)  # the weights' (a noise corrector keeps its own)
    model = load(checkpoint, o.config, o.kind, o.allow_pickle, recipe, o.base)
    with output_folder(out, o.force) as tmp:
        if o.format == "diffusers":
            fitted = None if model.corrector is None else model.corrector.guidance_scale  # its base sampler's
            own = recipe.sample.guidance_scale if model.adapter.classifier_free else recipe.sample.distilled_guidance
            written = export_diffusers(model, tmp, o.keep_adapter, dtype, own if fitted is None else fitted,
                                       recipe.model.autocast)
        elif o.format == "single-file":
            written = export_single_file(model, tmp, dtype)
        else:
            written = export_lora(model, tmp, o.lora_format, dtype)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    summary = {"checkpoint": checkpoint, "out": str(out), "format": o.format, **written, "files": files}
    view = [f"[green]wrote[/green] {o.format} export of {checkpoint} to {out}: {', '.join(files)}"]
    return Outcome(summary, view + ([f"note: {summary['note']}"] if summary.get("note") else []))
