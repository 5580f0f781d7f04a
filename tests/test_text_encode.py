"""Prompt encoding: each distinct prompt goes through the text encoders once, with the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.io.recipes import SampleConfig
from pgraft_cli.io.runstore import RunStore
from pgraft_cli.stages.sample import Conditions, run_sample


class NoBar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


def count_rows(encoder: torch.nn.Module) -> list[int]:
    """The batch size of every forward call of ``encoder`` (appended as they happen)."""
    rows: list[int] = []
    encoder.register_forward_pre_hook(lambda m, args, kwargs: rows.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return rows


def old_encode(model, prompts, class_labels, guidance_scale, distilled_guidance=None):
    """The previous path: the pipeline's encode_prompt on every row's prompt (duplicates included)."""
    from pgraft_cli.models.loaded import Cond

    pe, npe = model.pipeline.encode_prompt(prompts, model.device, 1, guidance_scale > 1.0)
    return Cond(prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=guidance_scale)


def sample_images(model, tmp: Path, name: str, prompts: list[str]) -> torch.Tensor:
    cfg = SampleConfig(num=6, steps=2, batch_size=6, lane=3, seed=4, guidance_scale=5.0)
    with RunStore(tmp / name) as store:
        result = run_sample(model, cfg, Conditions(prompts=prompts), store, NoBar())
    from safetensors.torch import load_file

    return torch.cat([load_file(str(p))["images"] for p in result.shards])


def test_sample_encodes_each_distinct_prompt_once_per_lane(tiny_sd_dir, tmp_path):
    model = load_model(str(tiny_sd_dir))
    rows = count_rows(model.pipeline.text_encoder)
    cfg = SampleConfig(num=8, steps=1, batch_size=8, lane=8, guidance_scale=7.5)
    with RunStore(tmp_path / "run") as store:
        run_sample(model, cfg, Conditions(prompts=["a red square"]), store, NoBar())
    # one row for the prompt and one for the negative (empty) prompt, as diffusers' pipeline does
    # for num_images_per_prompt = 8; before, 8 + 8 rows
    assert sum(rows) == 2


def pipeline_encode(model, prompts, cfg):
    """The family's diffusers pipeline's own encode_prompt, as (prompt, negative, pooled, negative pooled)."""
    if model.model_class == "SD3Transformer2DModel":
        return model.pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=model.device,
                                            num_images_per_prompt=1, do_classifier_free_guidance=cfg)
    if model.adapter.name == "sdxl":
        return model.pipeline.encode_prompt(prompt=prompts, device=model.device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=cfg)
    return (*model.pipeline.encode_prompt(prompts, model.device, 1, cfg), None, None)


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir", "tiny_sd3_dir"])
def test_each_row_is_its_prompt_encoded_alone_by_the_pipeline(fixture, request):
    # the bytes of diffusers' pipeline for one prompt, whatever else shares the batch: encoding
    # "a" beside four other prompts changes SDXL's and SD3's pooled projection in the last bits
    model = load_model(str(request.getfixturevalue(fixture)))
    prompts = ["a", "b c", "a", "d e f", "b c"]
    with torch.inference_mode():
        new = model.encode(prompts, None, guidance_scale=3.0)
        unguided = model.encode(prompts, None, guidance_scale=1.0)
        got = (new.prompt_embeds, new.negative_prompt_embeds, new.pooled, new.negative_pooled)
        for row, prompt in enumerate(prompts):
            ref = pipeline_encode(model, [prompt], True)
            for a, b in zip(got, ref):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.shape[0] == len(prompts) and torch.equal(a[row], b[0])
            assert unguided.negative_prompt_embeds is None and torch.equal(unguided.prompt_embeds[row], ref[0][0])
            if new.pooled is not None:
                assert torch.equal(model.pooled_text(prompts)[row], ref[2][0])


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_each_distinct_prompt_and_the_negative_are_encoded_once(fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)))
    encoders = [e for e in (model.pipeline.text_encoder, getattr(model.pipeline, "text_encoder_2", None)) if e]
    counts = [count_rows(e) for e in encoders]
    zeros = getattr(model.pipeline.config, "force_zeros_for_empty_prompt", False)  # SDXL: a zero negative
    with torch.inference_mode():
        model.encode(["a", "b"] * 4, None, guidance_scale=3.0)
    for rows in counts:  # before: 8 rows (and 8 negatives) per encoder for SDXL, 2 + 2 for SD
        assert rows == [1, 1] + ([] if zeros else [1])


def test_sampled_images_are_the_old_paths_bytes(tiny_sd_dir, tmp_path, monkeypatch):
    model = load_model(str(tiny_sd_dir))
    prompts = ["a red square", "a blue circle"]
    new = sample_images(model, tmp_path, "new", prompts)
    rows = count_rows(model.pipeline.text_encoder)
    monkeypatch.setattr(type(model), "encode", old_encode)
    old = sample_images(model, tmp_path, "old", prompts)
    assert sum(rows) == 12  # the old path really ran: 2 lanes x (3 prompts + 3 negatives)
    assert new.dtype == torch.uint8 and new.shape[0] == 6 and torch.equal(new, old)


def test_a_sampler_time_gives_the_bytes_of_the_same_time_per_row(tiny_sd_dir):
    # predict fills a 0-d (sampler) time in on the device instead of copying it over; the network
    # sees the same float32 timesteps as with one time per row (the copying path)
    model = load_model(str(tiny_sd_dir))
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cond = model.encode(["a", "b", "a"], None, guidance_scale=4.0)
        for t in (0.999, 0.5137, 0.001):
            filled = model.predict(x, torch.tensor(t, dtype=torch.float64), cond)
            copied = model.predict(x, torch.full((3,), t, dtype=torch.float64), cond)
            assert filled.shape == x.shape and torch.equal(filled, copied)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_pooled_text_embedding_skips_t5_and_equals_the_pooled_part_of_encode_text(family, request, tmp_path):
    """A text-conditioned corrector reads only the CLIP pooled embedding: SD3 (with its T5, as released) and Flux
    compute it with their CLIP encoders alone, T5-XXL never called, to the bit of the full encode_prompt's."""
    from conftest import build_tiny_sd3_pipeline

    folder = build_tiny_sd3_pipeline(tmp_path / "sd3", t5=True) if family == "sd3" else request.getfixturevalue("tiny_flux_dir")
    model = load_model(str(folder))
    t5 = model.pipeline.text_encoder_3 if family == "sd3" else model.pipeline.text_encoder_2
    calls = count_rows(t5)
    prompts = ["a red cube", "two cats"]
    pooled = model.adapter.pooled_text(model.pipeline, prompts, model.device, model.sample_shape)
    assert calls == []
    full = model.adapter.encode_text(model.pipeline, prompts, model.device, False, model.sample_shape).pooled
    assert calls == [2] and torch.equal(pooled, full)


def test_loaded_text_encoders_hold_aligned_weights_so_a_prompt_encodes_the_same_from_any_file(tiny_sdxl_dir):
    # one prompt at a time runs the CPU's matrix-vector kernels, whose rounding follows the weights'
    # alignment: a folder's memory map puts tensors at any 4-byte offset (its pooled embedding differed
    # from the single file's by 2.4e-7 before); every text encoder weight is 64-byte aligned once a prompt was encoded on the CPU
    from pgraft_cli.models.loaded import align_weights

    model = load_model(str(tiny_sdxl_dir))
    encoder = model.pipeline.text_encoder_2
    with torch.inference_mode():
        want = model.encode(["a red cube"], None, guidance_scale=3.0).pooled
    assert all(p.data_ptr() % 64 == 0 for e in (model.pipeline.text_encoder, encoder) for p in e.parameters())
    for param in encoder.parameters():  # the same values at an odd offset, as a memory map may place them
        flat = torch.empty(param.numel() + 1)[1:]
        flat.copy_(param.data.reshape(-1))
        param.data = flat.view(param.shape)
    assert any(p.data_ptr() % 64 for p in encoder.parameters())
    align_weights(encoder)
    assert all(p.data_ptr() % 64 == 0 for p in encoder.parameters())
    with torch.inference_mode():
        assert torch.equal(model.encode(["a red cube"], None, guidance_scale=3.0).pooled, want)
