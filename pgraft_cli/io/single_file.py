"""``--format single-file``: fused weights in a family's original single-file layout (SD 1.x/2.x)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.loaded import LoadedModel
from .export import ExportError


def export_single_file(model: LoadedModel, out: Path) -> dict[str, Any]:
    raise ExportError("not yet")
