"""Prompt encoding: each distinct prompt goes through the text encoders once, with the same bytes."""

from __future__ import annotations

from pathlib import Path

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


def test_encoding_equals_the_pipelines_row_by_row_bytes(tiny_sd_dir, tiny_sd3_dir):
    prompts = ["a", "b c", "a", "a", "b c"]
    for folder in (tiny_sd_dir, tiny_sd3_dir):
        model = load_model(str(folder))
        with torch.inference_mode():
            new = model.encode(prompts, None, guidance_scale=3.0)
            if model.model_class == "SD3Transformer2DModel":
                ref = model.pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=model.device,
                                                   num_images_per_prompt=1, do_classifier_free_guidance=True)
                got = (new.prompt_embeds, new.negative_prompt_embeds, new.pooled, new.negative_pooled)
            else:
                ref = model.pipeline.encode_prompt(prompts, model.device, 1, True)
                got = (new.prompt_embeds, new.negative_prompt_embeds)
            unguided = model.encode(prompts, None, guidance_scale=1.0)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.shape[0] == len(prompts) and torch.equal(a, b)
        assert unguided.negative_prompt_embeds is None and torch.equal(unguided.prompt_embeds, ref[0])


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
