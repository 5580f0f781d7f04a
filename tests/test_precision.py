"""Half precision: timesteps reach the network in float32; every verb runs in bf16 and fp16 on the CPU.

Images of a half-precision run are compared with the float32 run of the same seeds. The bounds
are set a few times above what was measured on the bundled digits model (see each test).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pgraft_cli.checkpoints import load_model
from pgraft_cli.cli import app
from pgraft_cli.models import Cond

runner = CliRunner()
HALF = ("bfloat16", "float16")


def _recording(network: torch.nn.Module) -> list[torch.Tensor]:
    """Record the timestep argument of every call of ``network`` (second positional or ``timestep=``)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["timestep"] if "timestep" in kwargs else args[1])

    network.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("dtype, t, expected", [(torch.bfloat16, 0.999, 999.0), (torch.float16, 0.99975, 999.75)])
def test_timestep_reaches_the_network_in_float32(dtype, t, expected):
    """bf16 rounds 999 to 1000 and fp16 999.75 to 999.5 or 1000; the network must see t * T exactly."""
    model = load_model("digits").to("cpu", dtype)
    seen = _recording(model.network)
    x = torch.randn(2, *model.sample_shape).to(dtype)
    with torch.inference_mode():
        out = model.predict(x, torch.tensor(t, dtype=torch.float64), Cond())
    assert seen[0].dtype == torch.float32
    assert seen[0].tolist() == [expected, expected]
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("pipeline", ["tiny_sd_dir", "tiny_sd3_dir"])
def test_text_models_take_float32_timesteps_in_bf16(pipeline, request):
    """UNet2DConditionModel and SD3's transformer embed a float32 timestep next to bf16 weights."""
    model = load_model(str(request.getfixturevalue(pipeline))).to("cpu", torch.bfloat16)
    seen = _recording(model.network)
    cond = model.encode(["a red cube"], None, guidance_scale=1.0)
    x = torch.randn(1, *model.sample_shape).to(torch.bfloat16)
    with torch.inference_mode():
        out = model.predict(x, torch.tensor(0.999, dtype=torch.float64), cond)
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [999.0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
