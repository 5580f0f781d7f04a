"""Data sets pgraft can name with ``--data``; for now the bundled alias ``digits``.

``digits`` is scikit-learn's copy of the UCI handwritten digits (1797 images, 8x8, values 0..16),
shipped inside scikit-learn, so nothing is downloaded. Resize rule: scale to [0, 1] by /16, then
bilinear up-sampling to 16x16 (``align_corners=False``), one grey channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIGITS_SIZE = 16


def load_digits(size: int = DIGITS_SIZE) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as images in [0, 1], shape (1797, 1, size, size), and their labels."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0), torch.tensor(bunch.target, dtype=torch.long)
