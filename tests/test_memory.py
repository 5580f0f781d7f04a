"""Memory at real size: gradient checkpointing, LoRA by default above a size, one network copy at
cutoff 0, VAE slicing/tiling for large images, and bf16 autocast for sampling."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.io.recipes import FinetuneConfig
from pgraft_cli.io.runstore import RunStore
from pgraft_cli.report.ui import progress
from pgraft_cli.stages.finetune import KeptSet, prepare_tuning, resolve_lora, run_finetune, tuning_choice


def _tuned(tmp_path, name, **cfg):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, 1, 16, 16, generator=g) * 0.5
    model = load_model("digits")
    with RunStore(tmp_path / name) as store, progress(False) as bar:
        run_finetune(model, KeptSet(y=y, t_c=0.0, x0=y), FinetuneConfig(steps=3, batch_size=4, **cfg), store, bar)
    return model


def test_gradient_checkpointing_is_switched_on_and_changes_no_weights(tmp_path):
    plain = _tuned(tmp_path, "plain")
    ckpt = _tuned(tmp_path, "ckpt", gradient_checkpointing=True)
    assert ckpt.tuned.is_gradient_checkpointing and not plain.tuned.is_gradient_checkpointing
    a, b = plain.tuned.state_dict(), ckpt.tuned.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6  # recomputed, not changed


def test_lora_is_the_default_above_lora_above_parameters():
    model = load_model("digits")
    n = model.parameter_count()
    assert resolve_lora(model, FinetuneConfig()).lora_rank == 0  # the bundled model: all weights
    assert resolve_lora(model, FinetuneConfig(lora_above=n - 1)).lora_rank == 16
    assert resolve_lora(model, FinetuneConfig(lora_above=n - 1, lora_rank=0)).lora_rank == 0  # a fixed rank stays
    text = tuning_choice(model, resolve_lora(model, FinetuneConfig(lora_above=n - 1)))
    assert text.startswith("LoRA rank 16 of ") and f"{n / 1e6:.1f} M" in text


@pytest.mark.parametrize("cutoff, copies_on_device", [(0.0, 1), (0.5, 2)])
def test_full_finetune_keeps_the_base_on_the_device_only_where_it_runs(cutoff, copies_on_device):
    model = load_model("digits")
    n = model.parameter_count()
    prepare_tuning(model, FinetuneConfig(cutoff=cutoff, lora_rank=0))
    model.to("meta")  # a stand-in device: whatever is not parked on the CPU moves there
    nets = [model.network, model.tuned]
    on_device = sum(p.numel() for net in nets for p in net.parameters() if p.device.type == "meta")
    assert on_device == copies_on_device * n and model.device.type == "meta"


def test_large_images_decode_in_slices_and_tiles_to_the_same_images(tiny_sd_dir, monkeypatch):
    import pgraft_cli.models.loaded as loaded

    model = load_model(str(tiny_sd_dir))
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    whole = model.decode(x)
    assert not model.vae.use_slicing and not model.vae.use_tiling  # 16 x 16 images: below both sizes
    monkeypatch.setattr(loaded, "VAE_SLICE_ABOVE", 15 * 15)
    monkeypatch.setattr(loaded, "VAE_TILE_ABOVE", 15 * 15)
    sliced = model.decode(x)
    assert model.vae.use_slicing and model.vae.use_tiling
    assert float((sliced - whole).abs().max()) < 1e-5


def test_autocast_setting():
    from pgraft_cli.pipelines.skeleton import autocast_dtype

    assert autocast_dtype("auto", "cuda", torch.float32) is torch.bfloat16
    assert autocast_dtype("auto", "cpu", torch.float32) is None
    assert autocast_dtype("no", "cuda", torch.float32) is None
    assert autocast_dtype("bf16", "cpu", torch.float32) is torch.bfloat16
    assert autocast_dtype("bf16", "cuda", torch.float16) is None  # half weights: nothing to autocast


def test_sampling_under_bf16_autocast_is_recorded_and_close(tmp_path):
    runner = CliRunner()
    outs = {}
    for name, sets in (("fp32", []), ("bf16", ["--set", "model.autocast=bf16"])):
        out = tmp_path / name
        result = runner.invoke(app, ["sample", "digits", "--num", "4", "--steps", "4", "--run-dir", str(tmp_path / f"r{name}"),
                                     "--out", str(out), "--json", *sets])
        assert result.exit_code == 0, result.output
        outs[name] = json.loads((out / "sampler.json").read_text())
    assert outs["fp32"]["autocast"] is None and outs["bf16"]["autocast"] == "torch.bfloat16"
    from pgraft_cli.stages.sample import load_images

    a, b = load_images(tmp_path / "rfp32"), load_images(tmp_path / "rbf16")
    assert 0 < float((a - b).abs().mean()) < 0.05  # bf16 changes the bytes a little, not the images
