"""Small networks pgraft ships: the digits classifier (a reward and a feature extractor) and the judge.

``arch="cnn"`` is the bundled reward classifier (``classifier:digits:K``, trained on digits-train);
``arch="mlp"`` is the judge (``classifier:judge:K``, ``--features judge``), a pixel MLP of another
architecture trained on another split (digits-judge), so that it can measure what the reward
optimises without sharing its blind spots.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64
    arch: str = "cnn"


class DigitsClassifier(nn.Module):
    """A small CNN (or pixel MLP) on images in [-1, 1]; ``features`` is its penultimate layer (for FID)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        if config.arch == "mlp":  # the judge: no convolutions, no normalisation, tanh
            pixels = config.in_channels * config.image_size ** 2
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 4 * w), nn.Tanh(),
                                      nn.Linear(4 * w, config.feature_dim), nn.Tanh())
            self.head = nn.Linear(config.feature_dim, config.num_classes)
            return
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * w, config.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


