"""Family rules read from the network's and the pipeline's configs: PixArt's micro-conditions flag,
the SDXL refiner's refusal, and a float16 VAE's ``force_upcast``."""

from __future__ import annotations

import pytest
import torch

from pgraft_cli.errors import ModelLoadError
from pgraft_cli.io.checkpoints import load_model

from conftest import _clip_config, _tiny_vae, build_tiny_clip_tokenizer


def test_pixart_micro_conditions_follow_use_additional_conditions_not_the_sample_size(tiny_pixart_dir):
    """A network with ``use_additional_conditions`` at another size than 128 gets the resolution and
    aspect ratio (the old ``sample_size == 128`` test gave it None, which the network cannot embed)."""
    from diffusers import PixArtTransformer2DModel

    model = load_model(str(tiny_pixart_dir))
    assert not model.pipeline.transformer.use_additional_conditions
    assert "resolution" not in model.encode(["a red cube"], None, 1.0).extra
    torch.manual_seed(0)
    config = {k: v for k, v in model.network.config.items() if not k.startswith("_")}
    config.update(use_additional_conditions=True, attention_head_dim=12, cross_attention_dim=24)  # width % 3 == 0
    model.network = model.pipeline.transformer = PixArtTransformer2DModel(**config)
    cond = model.encode(["a red cube", "a blue ball"], None, 1.0)
    assert cond.extra["resolution"].tolist() == [[16.0, 16.0]] * 2 and cond.extra["aspect_ratio"].tolist() == [[1.0]] * 2
    with torch.inference_mode():
        x = torch.randn(2, *model.sample_shape)
        out = model.predict(x, torch.tensor(0.5), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_an_sdxl_refiner_is_refused_in_one_line_at_load(tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 32)
    tokenizer = build_tiny_clip_tokenizer(tmp_path / "tokenizer-src")
    for flag in (True, False):  # the pipeline's flag, or the network's input size alone (diffusers' rule)
        folder = tmp_path / f"refiner-{flag}"
        StableDiffusionXLImg2ImgPipeline(vae=_tiny_vae(scaling_factor=0.13025), text_encoder=None, tokenizer=None,
                                         text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
                                         tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
                                         requires_aesthetics_score=flag).save_pretrained(folder)
        with pytest.raises(ModelLoadError, match="SDXL refiner") as err:
            load_model(str(folder))
        assert "\n" not in str(err.value)


def test_a_float16_vae_with_force_upcast_decodes_and_encodes_in_float32():
    """SDXL's VAE overflows in float16 (black images); with ``force_upcast`` it runs in float32 for the
    call, as diffusers' pipelines do, and stays float16 afterwards. Latents scaled to overflow float16."""
    from pgraft_cli.models.families.base import Family

    torch.manual_seed(0)
    vae = _tiny_vae(force_upcast=True).half()
    reference = _tiny_vae(force_upcast=True)
    reference.load_state_dict(vae.state_dict())  # the same float16-rounded weights, in float32
    z = torch.randn(1, 4, 4, 4) * 3e4 * vae.config.scaling_factor
    with torch.inference_mode():
        assert not torch.isfinite(vae.decode((z / vae.config.scaling_factor).half()).sample).all()  # the bug
        images = Family().decode(vae, z)
        torch.testing.assert_close(images, Family().decode(reference, z), rtol=0, atol=1e-5)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        torch.testing.assert_close(Family().encode_images(vae, x), Family().encode_images(reference, x), rtol=0, atol=1e-6)
    assert vae.dtype == torch.float16 and images.dtype == torch.float32
    vae.register_to_config(force_upcast=False)  # the flag off: the VAE runs in its own dtype
    with torch.inference_mode():
        assert Family().decode(vae, torch.zeros(1, 4, 4, 4)).dtype == torch.float16
