"""``pgraft export``: a checkpoint as files diffusers, ComfyUI or A1111 read without pgraft."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .skeleton import load, resolve_recipe


@dataclass
class ExportOptions:
    """What ``pgraft export`` takes besides CHECKPOINT and --out."""

    format: str = "diffusers"
    lora_format: str = "diffusers"
    keep_adapter: bool = False
    force: bool = False
    base: Optional[str] = None
    config: Optional[str] = None
    kind: Optional[str] = None
    allow_pickle: bool = False


def export(checkpoint: str, out: Path, o: ExportOptions) -> dict[str, Any]:
    """Check the format against the checkpoint, write everything into a fresh folder, move it onto ``out``."""
    from ..io.export import FORMATS, ExportError, export_diffusers, export_lora, output_folder

    if o.format not in FORMATS:
        raise ExportError(f"--format {o.format!r} is unknown; use one of {', '.join(FORMATS)}")
    if o.lora_format != "diffusers" and o.format != "lora":
        raise ExportError("--lora-format applies to --format lora only; drop it or pass --format lora")
    if o.keep_adapter and o.format != "diffusers":
        raise ExportError("--keep-adapter applies to --format diffusers only; drop it")
    if o.format == "single-file":  # the SD 1.x/2.x LDM key conversion is not written yet
        raise ExportError("--format single-file is not available yet; use --format diffusers (a pipeline folder), "
                          "or --format lora --lora-format kohya for ComfyUI and A1111")
    model = load(checkpoint, o.config, o.kind, o.allow_pickle, resolve_recipe("default", None), o.base)
    with output_folder(out, o.force) as tmp:
        if o.format == "diffusers":
            written = export_diffusers(model, tmp, o.keep_adapter)
        else:
            written = export_lora(model, tmp, o.lora_format)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"checkpoint": checkpoint, "out": str(out), "format": o.format, **written, "files": files}
