"""Reference statistics: a data set's feature statistics in one ``.npz``, cached and reusable.

A stats file holds the reference side of FID/KID as ``FidKid.reference_state`` gives it: the
float64 sums torchmetrics accumulates (``sum``, ``cov_sum``, ``n``, so FID from the file is the
FID from the images, bit for bit), ``mu`` and ``sigma`` for other tools, the float32 feature rows
(``features``, which KID and precision/recall need; an empty matrix skips them) and ``meta``, a
JSON string naming the extractor, the image shape and the data's identity. It is plain arrays:
read with ``np.load(allow_pickle=False)``, never unpickled.

Caches (``cache_dirs``): ``RUN_DIR/refstats`` and the user cache ``$XDG_CACHE_HOME/pgraft/stats``
(``~/.cache/pgraft/stats``), each file named by ``stats_key``, a hash of what the statistics
depend on: the extractor's identity (its weights' hash and resize rule), the image shape, the
data's content hash, the rule that resized the data (``io.data.RESIZE_RULES``) and ``STATS_VERSION``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PgraftError
from .runstore import atomic_write_bytes

FORMAT = "pgraft-stats-1"
ARRAYS = ("sum", "cov_sum", "n", "mu", "sigma", "features")
# Bump when the statistics of the same data, features and resize rule would change (how they are
# accumulated, in what arithmetic): cached files of an older version are then missed, never reused.
# 3: features in full float32 on every device (io.host.ieee_float32); a GPU's version 2 files hold TF32 features.
STATS_VERSION = 3


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pgraft/stats``, else ``~/.cache/pgraft/stats``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "pgraft" / "stats"


def cache_dirs(run_root: Path | None) -> list[Path]:
    return ([run_root / "refstats"] if run_root is not None else []) + [user_cache_dir()]


def data_identity(spec: str) -> str:
    """A bundled alias by name; a file or folder by the sha256 of its bytes (wherever it lies)."""
    from .checkpoints import identity_of
    from .data import ALIASES

    path = Path(spec).expanduser()
    if spec in ALIASES or not path.exists():
        return spec
    return f"sha256={identity_of(path)}"


def stats_key(features: str, image_shape: tuple[int, ...], data: str, resize: str) -> str:
    """sha256 of (extractor identity, image shape, data identity, the data's resize rule,
    ``STATS_VERSION``): the cache file's name."""
    payload = json.dumps({"features": features, "image_shape": list(image_shape), "data": data, "resize": resize,
                          "version": STATS_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def is_stats_file(spec: str | None) -> bool:
    """Whether ``spec`` names a pgraft stats ``.npz`` (an ``.npz`` of images is not one)."""
    if not spec or not spec.endswith(".npz") or not Path(spec).expanduser().is_file():
        return False
    try:
        with np.load(Path(spec).expanduser(), allow_pickle=False) as z:
            return "meta" in z.files and json.loads(str(z["meta"])).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_stats(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``state`` (``ARRAYS``) and ``meta`` atomically; ``path`` is returned."""
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps({"format": FORMAT, **meta}, sort_keys=True)),
             **{k: np.asarray(state[k]) for k in ARRAYS})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def stats_meta(path: Path | str) -> dict[str, Any]:
    """A stats file's ``meta`` alone (an ``.npz`` reads its members on demand, so the arrays stay on disk)."""
    with np.load(Path(path).expanduser(), allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


def load_stats(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, meta)`` of a stats file; a PgraftError if it is not one (nothing is unpickled)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT or any(k not in z.files for k in ARRAYS):
                raise ValueError(f"format {meta.get('format')!r}, arrays {sorted(z.files)}")
            state = {k: z[k] for k in ARRAYS}
            _check_shapes(state)
            return state, meta
    except (OSError, ValueError, KeyError) as exc:
        raise PgraftError(f"{path} is not a pgraft stats file ({str(exc)[:120]}); write one with "
                          f"pgraft stats DATA --features F --out ref.npz") from None


def _check_shapes(state: dict[str, np.ndarray]) -> None:
    """A ValueError unless the arrays agree: D features, ``n`` >= 2 images, and the rows either all
    ``n`` of them or none (KID and precision/recall take their subset sizes from ``n``)."""
    d = np.shape(state["sum"])
    n = state["n"]
    if len(d) != 1 or np.shape(n) != () or not np.issubdtype(n.dtype, np.integer) or int(n) < 2:
        raise ValueError(f"sum {d}, n {n!r}")
    d = d[0]
    expected = {"cov_sum": (d, d), "mu": (d,), "sigma": (d, d)}
    for k, shape in expected.items():
        if np.shape(state[k]) != shape:
            raise ValueError(f"{k} has shape {np.shape(state[k])}, {shape} for {d} features")
    rows = np.shape(state["features"])
    if len(rows) != 2 or rows[1] != d or rows[0] not in (0, int(n)):
        raise ValueError(f"features has shape {rows}: {int(n)} or 0 rows of {d} for n = {int(n)}")
