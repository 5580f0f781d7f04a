"""Data sets pgraft reads with ``--data``: an image folder, a tensor file, or a bundled alias.

- ``digits``: scikit-learn's copy of the UCI handwritten digits (1797 images, 8x8, values 0..16),
  shipped inside scikit-learn, so nothing is downloaded. Resize rule: scale to [0, 1] by /16, then
  bilinear up-sampling to 16x16 (``align_corners=False``), one grey channel.
- ``digits-train`` / ``digits-judge`` / ``digits-test``: a fixed, disjoint 60 / 20 / 20 % split of
  ``digits`` (1078 / 359 / 360 images), stratified by label. Rule (``digits_split``): within each
  label, images are ordered by ``sha256(f"pgraft-digits-split:{index}")`` (index into scikit-learn's
  order); the first ``round(0.6 n)`` go to train, the next ``round(0.2 n)`` to judge, the rest to
  test. It uses no random generator, so it is the same on every machine and library version. The
  bundled flow and reward classifier are trained on ``digits-train``, the judge classifier on
  ``digits-judge``; ``digits-test`` is held out for FID.
- a folder of ``.png``/``.jpg``/``.jpeg``/``.webp`` images (sorted by name). Resize rule: convert to
  the model's channels (L or RGB), resize so the shorter side equals the model's size (bicubic,
  PIL), then centre-crop to a square of that size. A 16-bit grey image (PIL mode ``I;16``/``I``) is
  scaled by 1/65535 and resized in float (PIL's own conversion to 8 bits clips it to white).
- an ``.npz`` (array ``images``, else its only array) or ``.safetensors`` (tensor ``images``) of
  shape (N, H, W), (N, H, W, C) or (N, C, H, W): uint8 is read as 0..255, floats as [0, 1]; it must
  already have the model's size.

Every loader returns float32 images in [0, 1], shape (N, C, H, W); ``iter_data`` streams the same
images in batches (a folder file by file), for metrics that need not hold them all, and
``data_rows`` reads any row range on demand (an inversion shard).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PgraftError

DIGITS_SIZE = 16
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DIGITS_SPLITS = {"train": 0.6, "judge": 0.2, "test": 0.2}
# Images per streamed batch; metrics feed reference images in these batches by every route, so the
# same data gives bit-identical FID whichever verb reads it.
READ_BATCH = 256
ALIASES = ("digits", *(f"digits-{name}" for name in DIGITS_SPLITS))
# How each kind of data is brought to the model's size (the module doc); part of the reference
# statistics' cache key, so edit the text whenever a rule changes.
RESIZE_RULES = {"digits": "/16, bilinear align_corners=False, clamp [0, 1]",
                "folder": "PIL convert L/RGB, bicubic shorter side, centre crop, /255; 16-bit grey /65535 in float",
                "tensor": "none: the model's size; uint8 /255"}


def resize_rule(spec: str) -> str:
    """The rule (``RESIZE_RULES``) that brings ``spec``'s images to the model's size."""
    kind = "digits" if spec in ALIASES else "folder" if Path(spec).expanduser().is_dir() else "tensor"
    return f"{kind}: {RESIZE_RULES[kind]}"


def digits_split(labels: Tensor, split: str) -> Tensor:
    """Indices (ascending) of one split of the digits: per label, hash order, 60 / 20 / 20 %.

    Within each label with ``n`` images, ordered by ``sha256(f"pgraft-digits-split:{index}")``: the
    first ``round(0.6 n)`` are ``train``, the next ``round(0.2 n)`` ``judge``, the rest ``test``.
    """
    import hashlib

    if split not in DIGITS_SPLITS:
        raise PgraftError(f"unknown digits split {split!r}; pick one of {', '.join(DIGITS_SPLITS)}")
    picked: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = sorted((i for i in range(len(labels)) if int(labels[i]) == label),
                         key=lambda i: hashlib.sha256(f"pgraft-digits-split:{i}".encode()).hexdigest())
        n_train, n_judge = round(DIGITS_SPLITS["train"] * len(members)), round(DIGITS_SPLITS["judge"] * len(members))
        bounds = {"train": (0, n_train), "judge": (n_train, n_train + n_judge), "test": (n_train + n_judge, len(members))}
        lo, hi = bounds[split]
        picked += members[lo:hi]
    return torch.tensor(sorted(picked), dtype=torch.long)


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
    """scikit-learn's digits file (64 pixel values, then the label, per row) read as its
    ``load_digits`` reads it (``np.loadtxt`` of the gzipped csv), located without importing
    scikit-learn, whose imports cost more than the read; read once per process."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits as _load

        bunch = _load()
        table = np.column_stack([bunch.data, bunch.target])
    else:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
    table.setflags(write=False)
    return table


def load_digits(size: int = DIGITS_SIZE, split: str | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as images in [0, 1], shape (N, 1, size, size), and their labels.

    ``split=None`` gives all 1797 images; ``train``/``judge``/``test`` one part of ``digits_split``.
    """
    table = _digits_table()
    images = torch.tensor(table[:, :-1].reshape(-1, 1, 8, 8), dtype=torch.float32) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images, labels = images.clamp(0.0, 1.0), torch.tensor(table[:, -1].astype(int), dtype=torch.long)
    if split is None:
        return images, labels
    keep = digits_split(labels, split)
    return images[keep], labels[keep]


def load_data(spec: str, shape: tuple[int, int, int]) -> Tensor:
    """Images in [0, 1] of the given (C, H, W) from a ``--data`` spec (see the module doc)."""
    channels, height, width = shape
    if spec in ALIASES:
        images, _ = load_digits(size=height, split=spec.partition("-")[2] or None)
        if (channels, height, width) != (1, height, height):
            raise PgraftError(f"--data {spec} gives 1 x {height} x {height} grey images, but the model "
                              f"makes {channels} x {height} x {width}; pass data of the model's shape")
        return images
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, channels, height, width)
    if path.is_file() and path.suffix in (".npz", ".safetensors"):
        return _check(_load_tensor_file(path), path, shape)
    if not path.exists():
        raise PgraftError(f"--data {spec}: no such file or directory; pass an image folder, an .npz or "
                          f".safetensors file, or one of: {', '.join(ALIASES)}")
    raise PgraftError(f"--data {spec}: unsupported file type '{path.suffix}'; use an image folder, .npz or .safetensors")


@dataclass(frozen=True)
class DataRows:
    """``load_data``'s images read by row range on demand: ``len(rows)`` and ``rows[a:b]`` (the
    values of ``load_data(...)[a:b]``). A folder decodes only those files and a ``.safetensors`` file
    reads only those rows; the digits and an ``.npz`` (a zip archive) are held whole.

    A row also carries its condition where the data has one: ``labels`` (the digits' labels, or a
    ``labels`` array beside ``images`` in an .npz/.safetensors file) and ``captions`` (one a line of
    ``--captions FILE``, else of ``captions.txt`` in an image folder), in row order."""

    num: int
    read: Callable[[int, int], Tensor]
    labels: Optional[Tensor] = None
    captions: Optional[tuple[str, ...]] = None

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, rows: slice) -> Tensor:
        start, stop, step = rows.indices(self.num)
        assert step == 1, "DataRows reads contiguous row ranges"
        return self.read(start, max(start, stop))

    def head(self, num: int) -> "DataRows":
        """The first ``num`` rows (all of them when ``num`` is 0 or more than there are)."""
        n = min(num, self.num) if num else self.num
        return DataRows(n, self.read, None if self.labels is None else self.labels[:n],
                        None if self.captions is None else self.captions[:n])


def data_rows(spec: str, shape: tuple[int, int, int], captions: Optional[str] = None) -> DataRows:
    """A ``--data`` spec as :class:`DataRows`: the spec is checked, no image is read yet."""
    from dataclasses import replace

    path = Path(spec).expanduser()
    if spec not in ALIASES and path.is_dir():
        files = _image_files(path)
        rows = DataRows(len(files), lambda a, b: torch.stack([_read_image(f, *shape) for f in files[a:b]]))
        captions = captions or (str(path / "captions.txt") if (path / "captions.txt").is_file() else None)
    elif spec not in ALIASES and path.is_file() and path.suffix == ".safetensors":
        rows = _safetensors_rows(path, shape)
    else:
        images = load_data(spec, shape)
        rows = DataRows(len(images), lambda a, b: images[a:b], _labels(spec, path, shape))
    return rows if captions is None else replace(rows, captions=_captions(Path(captions).expanduser(), rows.num))


def _labels(spec: str, path: Path, shape: tuple[int, int, int]) -> Optional[Tensor]:
    """The class labels of a digits alias, or the ``labels`` array of an .npz / .safetensors file."""
    if spec in ALIASES:
        return load_digits(size=shape[1], split=spec.partition("-")[2] or None)[1]
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            return torch.from_numpy(z["labels"].copy()).long() if "labels" in z.files else None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor("labels").long() if "labels" in f.keys() else None


def read_utf8(path: Path, option: str) -> str:
    """A text file the user passed (``option`` names it in the error) read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PgraftError(f"{option} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None


def _captions(path: Path, num: int) -> tuple[str, ...]:
    """One caption a line, one line per image in data order."""
    if not path.is_file():
        raise PgraftError(f"--captions {path}: no such file; pass a text file with one caption per line, in data order")
    lines = tuple(read_utf8(path, "--captions").splitlines())
    if len(lines) != num:
        raise PgraftError(f"{path} holds {len(lines)} captions for {num} images; give one caption per line, in data order")
    return lines


def iter_data(spec: str, shape: tuple[int, int, int], batch: int = READ_BATCH) -> Iterator[Tensor]:
    """``load_data``'s images in batches of at most ``batch``, in the same order, streamed.

    A folder is read file by file and a ``.safetensors`` file row range by row range, so memory
    holds one batch; the digits and an ``.npz`` (a zip archive, read whole) are split after loading.
    The spec is checked (and the first batch read) before this returns, so a bad ``--data`` fails
    before any sampling.
    """
    rows = data_rows(spec, shape)
    first = rows[0:batch]  # a wrong shape or range fails here, before sampling

    def rest() -> Iterator[Tensor]:
        yield first
        for a in range(batch, len(rows), batch):
            yield rows[a:a + batch]

    return rest()


def _image_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PgraftError(f"--data {path}: no .png/.jpg/.jpeg/.webp images in the folder")
    return files


def _read_image(f: Path, channels: int, height: int, width: int) -> Tensor:
    """One image file by the folder resize rule (module doc), as floats in [0, 1], (C, H, W)."""
    from PIL import Image

    try:
        im = Image.open(f)
        im.load()
        wide = im.mode in SIXTEEN_BIT
        if wide:  # PIL's convert("L") clips 16-bit values at 255: scale them into a float image instead
            values = np.asarray(im, dtype=np.float32)
            if values.min() < 0 or values.max() > 65535:
                raise PgraftError(f"--data: {f} holds {im.mode} values outside 0..65535; save it as 8- or 16-bit")
            im = Image.fromarray((values / 65535.0).astype(np.float32))  # mode "F"
        else:
            im = im.convert("L" if channels == 1 else "RGB")
    except OSError as exc:
        raise PgraftError(f"--data: {f} is not a readable image ({exc}); remove or replace it") from None
    scale = max(height / im.height, width / im.width)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    im = im.crop((left, top, left + width, top + height))
    if wide:  # bicubic may overshoot [0, 1] in float, as the 8-bit path clamps it
        grey = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).clamp(0, 1)
        return grey.expand(channels, height, width).clone()
    arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(height, width, channels)
    return arr.permute(2, 0, 1).float() / 255.0


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of a 16-bit grey PNG


def _load_folder(path: Path, channels: int, height: int, width: int) -> Tensor:
    return torch.cat(list(iter_data(str(path), (channels, height, width))))


def _safetensors_rows(path: Path, shape: tuple[int, int, int]) -> DataRows:
    """The ``images`` tensor of a .safetensors file, read row range by row range (``get_slice``)."""
    from safetensors import safe_open

    def rows(a: int, b: int) -> Tensor:
        with safe_open(str(path), "pt") as f:
            array = f.get_slice("images")[a:b]
        return _check(array.float() / 255.0 if array.dtype == torch.uint8 else array.float(), path, shape)

    with safe_open(str(path), "pt") as f:
        if "images" not in f.keys():
            raise PgraftError(f"--data {path}: no tensor named 'images' (has {sorted(f.keys())})")
        return DataRows(f.get_slice("images").get_shape()[0], rows, _labels(str(path), path, shape))


def _load_tensor_file(path: Path) -> Tensor:
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "images" if "images" in keys else keys[0] if len(keys) == 1 else None
            if key is None:
                raise PgraftError(f"--data {path}: holds {keys}; name the image array 'images'")
            try:
                array = torch.from_numpy(z[key].copy())
            except (ValueError, TypeError) as exc:  # object arrays (never unpickled), strings ...
                raise PgraftError(f"--data {path}: its '{key}' array is not numbers ({str(exc).split(chr(10))[0]}); "
                                  f"save the images as a uint8 or float array") from None
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "images" not in tensors:
            raise PgraftError(f"--data {path}: no tensor named 'images' (has {sorted(tensors)})")
        array = tensors["images"]
    if array.dtype == torch.uint8:
        return array.float() / 255.0
    return array.float()


def _check(images: Tensor, path: Path, shape: tuple[int, int, int]) -> Tensor:
    c, h, w = shape
    if images.numel() == 0:
        raise PgraftError(f"--data {path}: holds no images (shape {tuple(images.shape)}); pass a file with at least one")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim == 4 and images.shape[1] != c and images.shape[-1] == c:
        images = images.permute(0, 3, 1, 2)
    if tuple(images.shape[1:]) != (c, h, w):
        raise PgraftError(f"--data {path}: images of shape {tuple(images.shape[1:])}, but the model makes "
                          f"{c} x {h} x {w}; resize them or pass an image folder (resized automatically)")
    if images.min() < 0 or images.max() > 1:
        raise PgraftError(f"--data {path}: float images must be in [0, 1] (got {images.min():.2f}..{images.max():.2f})")
    return images.contiguous()
