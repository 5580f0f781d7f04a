"""DiT: ``DiTTransformer2DModel``, class-conditional on ImageNet, with learned sigma.

Its label table has a row past the last class (``num_embeds_ada_norm``, 1000 for ImageNet), the
null class ``DiTPipeline`` uses for classifier-free guidance. The learned-variance channels are
dropped by ``LoadedModel.predict``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Cond, Family


class DiT(Family):
    name = "dit"
    network_class = "DiTTransformer2DModel"

    def conditioning(self, config: dict[str, Any]):
        classes = int(config.get("num_embeds_ada_norm") or 1000)
        return "class", classes, classes

    def call(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return network(x, timestep=timestep, class_labels=cond.class_labels).sample


FAMILY = DiT()
