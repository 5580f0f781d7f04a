"""The demo trainer's flow fit is the package's flow-matching loss through the shared training loop,
step for step the plain loop the bundled digits flow was trained with (so its assets stay reproducible)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from pgraft_cli.demo.train import FlowTraining, fit_flow

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
            norm_num_groups=4, attention_head_dim=8)


def plain_loop(model: torch.nn.Module, data: torch.Tensor, s: FlowTraining, g: torch.Generator) -> list[float]:
    """The loop as the assets were trained: AdamW, LambdaLR warm-up, clip 1, ``|v(x_t, 1000 t) - (e - x0)|^2``."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup))
    losses = []
    for _ in range(s.steps):
        x0 = data[torch.randint(0, len(data), (s.batch_size,), generator=g)]
        e = torch.randn(x0.shape, generator=g)
        t = torch.rand(x0.shape[0], generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * e
        loss = F.mse_loss(model(xt, t * 1000).sample, e - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_fit_flow_matches_the_plain_loop_the_assets_were_trained_with(capsys):
    settings = FlowTraining(steps=5, batch_size=8, warmup=3)
    data = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    ref, new = UNet2DModel(**TINY), UNet2DModel(**TINY)
    new.load_state_dict(ref.state_dict())
    ref_losses = plain_loop(ref.train(), data, settings, torch.Generator().manual_seed(0))
    last = fit_flow(new, data, settings, torch.Generator().manual_seed(0), log=True)
    torch.testing.assert_close(last.item(), ref_losses[-1], rtol=1e-6, atol=0)
    logged = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert logged == [round(ref_losses[0], 4), round(ref_losses[-1], 4)]  # steps 0 and 4 are printed
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert ref_losses[-1] < ref_losses[0]  # it trains


def test_the_data_note_names_a_split_rule_that_exists():
    """The note written into a trained model's provenance named ``pgraft_cli.data.digits_split``, a module the
    package no longer has (the rule lives in ``pgraft_cli.io.data``)."""
    import importlib
    import re

    from pgraft_cli.demo.train import DATA_NOTE

    dotted = re.search(r"split rule ([\w.]+)", DATA_NOTE).group(1)
    module, name = dotted.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))
