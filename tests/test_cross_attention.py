"""Cross-attention keys and values reused for the same conditioning: the same bytes, fewer projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pgraft_cli.io.checkpoints import load_model
from pgraft_cli.io.recipes import SampleConfig
from pgraft_cli.io.runstore import RunStore
from pgraft_cli.models.cross_attention import (cached_projection_count, cross_attention_cache,
                                               cross_attention_projections)
from pgraft_cli.models.families.base import Cond
from pgraft_cli.stages import sample as sample_stage
from pgraft_cli.stages.sample import Conditions, run_sample


class NoBar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


@pytest.fixture
def linear_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of every ``nn.Linear`` forward that really multiplies (a cache hit does not)."""
    calls: list[int] = []
    real = nn.Linear.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    return calls


def tiny_text_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8).eval().requires_grad_(False)


def test_the_same_states_twice_project_once_with_the_uncached_bytes(linear_calls):
    unet = tiny_text_unet()
    projections = cross_attention_projections(unet)
    layers = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
    assert len(layers) == 4 and len(projections) == 2 * 4  # to_k and to_v of each (down, mid, two up)
    g = torch.Generator().manual_seed(1)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.inference_mode():
        plain = [unet(x, t, encoder_hidden_states=states).sample for t in (900, 400)]
        linear_calls.clear()
        plain_calls = [unet(x, 900, encoder_hidden_states=states).sample] and len(linear_calls)
        linear_calls.clear()
        with cross_attention_cache([unet]) as n:
            assert n == 8 and cached_projection_count(unet) == 8
            cached = [unet(x, t, encoder_hidden_states=states).sample for t in (900, 400)]
        assert cached_projection_count(unet) == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert len(linear_calls) == 2 * plain_calls - 8  # the second call projected the states 8 times fewer
    assert "forward" not in projections[0].__dict__
    assert sorted(unet.state_dict()) == sorted(tiny_text_unet().state_dict())  # the module tree is untouched


def test_other_states_or_states_written_in_place_are_projected_again(linear_calls):
    unet = tiny_text_unet()
    proj = cross_attention_projections(unet)[0]
    g = torch.Generator().manual_seed(2)
    states = torch.randn(2, 7, 16, generator=g)
    # under no_grad, not inference_mode: an inference tensor keeps no version counter (its identity alone)
    with torch.no_grad(), cross_attention_cache([unet]):
        first = proj(states)
        assert proj(states) is first and len(linear_calls) == 1
        equal_copy = states.clone()
        assert proj(equal_copy) is not first and len(linear_calls) == 2  # identity, not equality, is the key
        equal_copy.mul_(2.0)  # written in place: its version moves on
        doubled = proj(equal_copy)
        assert proj.bias is None and len(linear_calls) == 3 and torch.allclose(doubled, 2.0 * first, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = proj(equal_copy)
        assert low.dtype == torch.bfloat16 and len(linear_calls) == 4  # another autocast state: projected again
        proj.weight.mul_(0.5)  # new weights (in place): projected again
        assert not torch.equal(proj(equal_copy), doubled) and len(linear_calls) == 5


def test_no_entry_is_kept_under_autograd_or_for_lora_layers():
    from pgraft_cli.models.lora import add_lora

    unet = tiny_text_unet().requires_grad_(True)
    proj = cross_attention_projections(unet)[0]
    states = torch.randn(2, 7, 16)
    with cross_attention_cache([unet]):
        a = proj(states)
        b = proj(states)
        assert a is not b and a.requires_grad  # each call its own graph
    add_lora(unet, rank=2, alpha=2)  # the attention projections become peft layers
    assert cross_attention_projections(unet) == []  # their output also follows the adapter's switch


def test_guided_batch_is_the_same_object_until_a_source_changes():
    pe, npe = torch.randn(2, 7, 16), torch.zeros(2, 7, 16)
    cond = Cond(prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=5.0)
    batch = cond.guided_batch(None)
    assert torch.equal(batch.prompt_embeds, torch.cat([npe, pe]))
    assert cond.guided_batch(None) is batch
    pe.add_(1.0)  # a source written in place
    again = cond.guided_batch(None)
    assert again is not batch and torch.equal(again.prompt_embeds, torch.cat([npe, pe]))
    cond.prompt_embeds = torch.randn(2, 7, 16)  # a source replaced
    assert torch.equal(cond.guided_batch(None).prompt_embeds, torch.cat([npe, cond.prompt_embeds]))
    third = cond.guided_batch(None)
    third.prompt_embeds.zero_()  # the batch itself written into: made again
    assert torch.equal(cond.guided_batch(None).prompt_embeds, torch.cat([npe, cond.prompt_embeds]))


def sampled(model, tmp: Path, name: str) -> torch.Tensor:
    """The float samples (model space, before the VAE and the uint8 rounding) of a small guided run."""
    cfg = SampleConfig(num=4, steps=3, batch_size=4, lane=2, seed=3, guidance_scale=4.0)
    with RunStore(tmp / name) as store:
        result = run_sample(model, cfg, Conditions(prompts=["a red square", "a blue circle"]), store, NoBar())
    return torch.cat([load_file(str(p))["samples"] for p in result.shards])


def no_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages without the reuse: every call projects the prompt's states."""
    monkeypatch.setattr(sample_stage, "reused_cross_attention", lambda model, enabled=True: cross_attention_cache([], False))


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sdxl_dir"])
def test_the_sample_stage_projects_each_lane_s_prompts_once_with_the_same_bytes(fixture, request, tmp_path, monkeypatch,
                                                                                linear_calls):
    model = load_model(str(request.getfixturevalue(fixture)))
    n = len(cross_attention_projections(model.network))
    assert n > 0
    cached = sampled(model, tmp_path, "cached")
    rows_cached = len(linear_calls)
    linear_calls.clear()
    no_reuse(monkeypatch)
    plain = sampled(model, tmp_path, "plain")
    assert torch.equal(cached, plain)
    # two lanes of three guided steps: the second and third step of each lane reuse every projection
    assert len(linear_calls) - rows_cached == 2 * 2 * n


@pytest.mark.parametrize("fixture, reused", [("tiny_sd_dir", True), ("tiny_sdxl_dir", True), ("tiny_pixart_dir", False)])
def test_the_families_that_pass_the_prompt_states_as_given_reuse_them(fixture, reused, request):
    """SD and SDXL hand the prompt's states to every cross-attention layer as given; PixArt projects them
    inside the forward (new tensors every call), so caching there would only hold memory."""
    model = load_model(str(request.getfixturevalue(fixture)))
    assert cross_attention_projections(model.network)  # each has cross-attention layers
    with sample_stage.reused_cross_attention(model) as n:
        assert (n > 0) == reused
    with sample_stage.reused_cross_attention(model, enabled=False) as n:
        assert n == 0


def test_a_lora_fine_tune_switching_at_its_cutoff_samples_the_same_bytes_with_plain_keys_and_values_reused(
        tiny_sd_dir, tmp_path, monkeypatch, linear_calls):
    """P-GRAFT with LoRA on the queries and outputs only: the adapter switches on above the cutoff while
    the key and value projections stay plain ``nn.Linear`` layers, reused across the switch."""
    from pgraft_cli.models.lora import add_lora

    model = load_model(str(tiny_sd_dir))
    torch.manual_seed(5)
    add_lora(model.network, rank=2, alpha=2, targets=["to_q", "to_out.0"])
    with torch.no_grad():
        for name, p in model.network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter that changes the output
    model.lora, model.cutoff = True, 0.5
    assert cross_attention_projections(model.network)  # the keys and values are still plain layers
    reused = sampled(model, tmp_path, "reused")
    calls = len(linear_calls)
    linear_calls.clear()
    no_reuse(monkeypatch)
    plain = sampled(model, tmp_path, "plain")
    assert torch.equal(reused, plain) and len(linear_calls) > calls


def test_the_text_inversion_reuses_the_keys_and_values_with_the_same_bytes(tiny_sd_dir, linear_calls):
    """A shard's lanes as ``run_invert`` runs them (inside ``reused_cross_attention``), against none."""
    from pgraft_cli.io.recipes import CorrectConfig
    from pgraft_cli.stages.correct import _invert_shard

    model = load_model(str(tiny_sd_dir))
    x = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(6))
    cfg = CorrectConfig(base_steps=3, inversion_iterations=4, inversion_tol=1e-6)
    prompts = ["a red square", "a blue circle", "a red square", "a green cube"]

    def invert(reuse: bool):
        linear_calls.clear()
        with torch.inference_mode(), sample_stage.reused_cross_attention(model, enabled=reuse) as n:
            out = _invert_shard(model, x, cfg, 4, lambda n: None, prompts=prompts, guidance_scale=3.0)
        assert (n > 0) == reuse
        return out, len(linear_calls)

    (reused, fewer), (plain, more) = invert(True), invert(False)
    assert set(reused) == set(plain) and all(torch.equal(reused[k], plain[k]) for k in reused)
    assert fewer < more


def test_the_kept_keys_and_values_never_pass_the_budget_and_the_rest_are_projected_each_call(linear_calls):
    unet = tiny_text_unet()
    g = torch.Generator().manual_seed(7)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    widths = [p.out_features for p in cross_attention_projections(unet)]
    one = 2 * 7 * min(widths) * 4  # bytes of the narrowest projection's output (float32): the first one called
    with torch.inference_mode():
        plain = unet(x, 500, encoder_hidden_states=states).sample
        linear_calls.clear()
        unet(x, 500, encoder_hidden_states=states)
        per_call = len(linear_calls)
        linear_calls.clear()
        with cross_attention_cache([unet], budget=one) as n:  # room for one of the eight outputs
            a = unet(x, 500, encoder_hidden_states=states).sample
            b = unet(x, 500, encoder_hidden_states=states).sample
    assert n == 8 and torch.equal(a, plain) and torch.equal(b, plain)
    assert len(linear_calls) == 2 * per_call - 1  # only the one kept output was reused


def test_a_conditioning_that_requires_grad_gets_its_own_guided_batch_every_call():
    pe = torch.randn(2, 7, 16, requires_grad=True)
    cond = Cond(prompt_embeds=pe, negative_prompt_embeds=torch.zeros(2, 7, 16), guidance_scale=5.0)
    first, second = cond.guided_batch(None), cond.guided_batch(None)
    assert first is not second and first.prompt_embeds.requires_grad


def test_a_guided_batch_memo_leaves_the_flop_key_of_a_conditioning_as_it_was():
    from pgraft_cli.core.metrics import structure

    cond = Cond(prompt_embeds=torch.randn(2, 7, 16), negative_prompt_embeds=torch.zeros(2, 7, 16), guidance_scale=5.0)
    before = structure(cond)
    cond.guided_batch(None)
    assert cond._guided is not None and structure(cond) == before
