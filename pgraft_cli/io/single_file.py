"""diffusers state dicts -> the original single-file layout of Stable Diffusion 1.x/2.x (CompVis / Stability AI).

One checkpoint holds three networks under fixed prefixes:

- UNet -> ``model.diffusion_model.*``: ``input_blocks.k`` (k = 0 ``conv_in``, then per down block ``i``
  its ``L`` layers at ``1 + i (L + 1) + j`` and its downsampler at ``(i + 1)(L + 1)``), ``middle_block.{0,1,2}``,
  ``output_blocks.k`` (per up block ``i`` its ``L + 1`` layers at ``i (L + 1) + j``, the upsampler beside
  the last one); ``L`` = layers per block. A layer is ``.0`` resnet, ``.1`` attention.
- VAE -> ``first_stage_model.*``: ``down.i.block.j``, ``mid.block_1/attn_1/block_2``, ``up.(n-1-i)``; the
  mid-block attention's Linear weights become 1x1 convolutions.
- text encoder -> ``cond_stage_model.transformer.text_model.*`` (SD 1.x, OpenAI CLIP: transformers' own
  keys) or ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP: ``transformer.resblocks.i`` with q, k, v
  stacked into ``attn.in_proj_*``). An SD 2.x file from diffusers has the 23 layers SD 2 runs (the
  original's unused 24th and ``text_projection`` are not invented). SDXL has two: CLIP-L under
  ``conditioner.embedders.0.transformer.text_model.*`` and OpenCLIP bigG under
  ``conditioner.embedders.1.model.*`` with its ``text_projection`` (the pooled embedding's).
- Flux.1 (Black Forest Labs' files hold the transformer alone, bare keys): ``double_blocks.i`` (``img_*`` /
  ``txt_*`` streams, fused ``qkv``), ``single_blocks.i`` (``linear1`` = qkv + MLP in), ``img_in``, ``txt_in``,
  ``time_in``, ``vector_in``, ``guidance_in`` (dev), ``final_layer``.
- SD3 / SD3.5 (Stability AI): the MMDiT under ``model.diffusion_model.*`` (``joint_blocks.i.x_block`` /
  ``context_block``, fused ``qkv``; ``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``,
  ``pos_embed``, ``final_layer``), the VAE under ``first_stage_model.*``, and the text encoders with transformers'
  keys under ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` and
  ``text_encoders.t5xxl.transformer.*``.

Reading such files back (``pgraft sample model.safetensors --config DIR``): :func:`detect_layout` names
the released layout (SD 1.x/2.x, SDXL, Flux.1, SD3 / SD3.5) from the keys alone; the loading itself is diffusers'
``from_single_file`` (io/checkpoints.py).

Pure: tensors in, tensors out, no files. Each network is a table of ``(pattern, prefix, renames)``
rules: the first rule whose regex matches the start of a key gives the new prefix (a function of
the matched indices), and ``renames`` rewrites the head of the rest of the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Collection, Mapping, Optional, Sequence

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

Prefix = Callable[[Sequence[int], dict], str]
Rule = tuple[str, Prefix, Mapping[str, str]]

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"self_attn": "attn", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj"}


def _fixed(prefix: str) -> Prefix:
    return lambda g, c: prefix


def _down(g: Sequence[int], c: dict) -> int:
    return 1 + g[0] * (c["L"] + 1) + g[1]


def _up(g: Sequence[int], c: dict) -> int:
    return g[0] * (c["L"] + 1) + g[1]


UNET_RULES: list[Rule] = [
    (r"time_embedding\.linear_1\.", _fixed("time_embed.0."), {}),
    (r"time_embedding\.linear_2\.", _fixed("time_embed.2."), {}),
    (r"add_embedding\.linear_1\.", _fixed("label_emb.0.0."), {}),  # SDXL's pooled text + time ids
    (r"add_embedding\.linear_2\.", _fixed("label_emb.0.2."), {}),
    (r"conv_in\.", _fixed("input_blocks.0.0."), {}),
    (r"conv_norm_out\.", _fixed("out.0."), {}),
    (r"conv_out\.", _fixed("out.2."), {}),
    (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda g, c: f"input_blocks.{_down(g, c)}.0.", RESNET),
    (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda g, c: f"input_blocks.{_down(g, c)}.1.", {}),
    (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda g, c: f"input_blocks.{(g[0] + 1) * (c['L'] + 1)}.0.op.", {}),
    (r"mid_block\.resnets\.(\d+)\.", lambda g, c: f"middle_block.{2 * g[0]}.", RESNET),
    (r"mid_block\.attentions\.0\.", _fixed("middle_block.1."), {}),
    (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda g, c: f"output_blocks.{_up(g, c)}.0.", RESNET),
    (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda g, c: f"output_blocks.{_up(g, c)}.1.", {}),
    (r"up_blocks\.(\d+)\.upsamplers\.0\.",  # beside the block's last layer: after its attention, if any
     lambda g, c: f"output_blocks.{_up((g[0], c['L']), c)}.{1 + (g[0] in c['up_attention'])}.", {}),
]

VAE_RULES: list[Rule] = [
    (r"(?:encoder|decoder)\.conv_(?:in|out)\.|(?:post_)?quant_conv\.", lambda g, c: c["match"], {}),
    (r"(encoder|decoder)\.conv_norm_out\.", lambda g, c: f"{c['part']}.norm_out.", {}),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda g, c: f"encoder.down.{g[0]}.block.{g[1]}.", VAE_RESNET),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda g, c: f"encoder.down.{g[0]}.downsample.", {}),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda g, c: f"decoder.up.{c['n'] - 1 - g[0]}.block.{g[1]}.",
     VAE_RESNET),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda g, c: f"decoder.up.{c['n'] - 1 - g[0]}.upsample.", {}),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda g, c: f"{c['part']}.mid.block_{g[0] + 1}.", VAE_RESNET),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", lambda g, c: f"{c['part']}.mid.attn_1.", VAE_ATTENTION),
]

OPEN_CLIP_RULES: list[Rule] = [
    (r"embeddings\.token_embedding\.", _fixed("token_embedding."), {}),
    (r"embeddings\.position_embedding\.weight$", _fixed("positional_embedding"), {}),
    (r"final_layer_norm\.", _fixed("ln_final."), {}),
    (r"text_projection\.weight$", _fixed("text_projection"), {}),  # transposed in clip_to_single_file
    (r"encoder\.layers\.(\d+)\.", lambda g, c: f"transformer.resblocks.{g[0]}.", OPEN_CLIP_LAYER),
]


def convert(state: Mapping[str, Tensor], rules: list[Rule], context: dict) -> dict[str, Tensor]:
    """Each key through the first matching rule: ``prefix(indices) + renames(rest)``; unknown keys are refused
    (a weight silently dropped would load as random weights elsewhere)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, prefix, renames in rules:
            m = re.match(pattern, key)
            if m:
                break
        else:
            raise ValueError(f"{key} has no place in the single-file layout")
        words = [w for w in m.groups() if w is not None]
        ctx = {**context, "match": m.group(0), "part": words[0] if words and not words[0].isdigit() else ""}
        rest = key[m.end():]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[prefix([int(w) for w in words if w.isdigit()], ctx) + rest] = value
    return out


def unet_names(state: Mapping[str, Tensor], layers_per_block: int,
               up_attention: Optional[Collection[int]] = None) -> dict[str, Tensor]:
    """The UNet's keys in the original layout, without ``UNET_PREFIX`` (kohya's SDXL LoRA names its modules so).
    ``up_attention``: the up blocks with attention (default: those ``state`` has); an upsampler follows it."""
    if up_attention is None:
        up_attention = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return convert(state, UNET_RULES, {"L": layers_per_block, "up_attention": set(up_attention)})


def unet_to_single_file(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    return {UNET_PREFIX + k: v for k, v in unet_names(state, layers_per_block).items()}


def vae_to_single_file(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Also ``(out, in) -> (out, in, 1, 1)`` for the mid-block attention (a 1x1 conv in the original)."""
    n = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    converted = convert(state, VAE_RULES, {"n": n})
    return {VAE_PREFIX + k: v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v
            for k, v in converted.items()}


def clip_to_single_file(state: Mapping[str, Tensor], open_clip: bool,
                        prefix: Optional[str] = None) -> dict[str, Tensor]:
    """SD 1.x: transformers' CLIP keys under ``CLIP_PREFIX``; SD 2.x: the OpenCLIP layout, where
    ``in_proj = [W_q; W_k; W_v]`` stacked along the output dimension, and the pooled projection
    ``text_projection = W^T`` (OpenCLIP computes ``x @ P``, a Linear ``x W^T``). ``prefix``: another root
    (SDXL's embedders)."""
    flat = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    if not open_clip:
        return {(prefix or CLIP_PREFIX) + k: v for k, v in flat.items()}
    for key in [k for k in flat if ".self_attn.q_proj." in k]:
        parts = [flat.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        flat[key.replace("q_proj.", "in_proj_")] = torch.cat(parts, dim=0)
    converted = convert(flat, OPEN_CLIP_RULES, {})
    return {(prefix or OPEN_CLIP_PREFIX) + k: v.T if k == "text_projection" else v for k, v in converted.items()}


FLUX_MLP = {"linear_1": "in_layer", "linear_2": "out_layer"}
FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.qkv": "img_attn.qkv",
               "attn.add_qkv": "txt_attn.qkv", "attn.norm_q": "img_attn.norm.query_norm",
               "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
               "attn.norm_added_k": "txt_attn.norm.key_norm", "attn.to_out.0": "img_attn.proj",
               "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
               "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
               "proj_out": "linear2"}
FLUX_RULES: list[Rule] = [
    (r"time_text_embed\.timestep_embedder\.", _fixed("time_in."), FLUX_MLP),
    (r"time_text_embed\.text_embedder\.", _fixed("vector_in."), FLUX_MLP),
    (r"time_text_embed\.guidance_embedder\.", _fixed("guidance_in."), FLUX_MLP),
    (r"context_embedder\.", _fixed("txt_in."), {}),
    (r"x_embedder\.", _fixed("img_in."), {}),
    (r"proj_out\.", _fixed("final_layer.linear."), {}),
    (r"norm_out\.linear\.", _fixed("final_layer.adaLN_modulation.1."), {}),  # halves swapped in flux_to_single_file
    (r"transformer_blocks\.(\d+)\.", lambda g, c: f"double_blocks.{g[0]}.", FLUX_DOUBLE),
    (r"single_transformer_blocks\.(\d+)\.", lambda g, c: f"single_blocks.{g[0]}.", FLUX_SINGLE),
]
# Projections BFL runs as one Linear: its rows are the diffusers ones stacked in this order.
FLUX_STACKS = ((r"(transformer_blocks\.\d+\.attn\.)to_q\.", ("to_q", "to_k", "to_v"), "qkv"),
               (r"(transformer_blocks\.\d+\.attn\.)add_q_proj\.", ("add_q_proj", "add_k_proj", "add_v_proj"), "add_qkv"),
               (r"(single_transformer_blocks\.\d+\.)attn\.to_q\.", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                "linear1"))


def flux_to_single_file(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in Black Forest Labs' released layout (bare keys, as
    flux1-dev/schnell.safetensors hold them): the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``.

    ``qkv = [W_q; W_k; W_v]`` per stream, a single block's ``linear1 = [W_q; W_k; W_v; W_mlp]`` (rows stacked),
    RMSNorm ``weight`` -> ``scale``, and the final norm's ``(scale, shift)`` rows swapped into BFL's ``(shift, scale)``
    (the swap is its own inverse)."""
    converted = convert(stack_rows(state, FLUX_STACKS), FLUX_RULES, {})
    out = {}
    for k, v in converted.items():
        if k.startswith("final_layer.adaLN_modulation."):
            v = swap_halves(v)
        out[re.sub(r"(query|key)_norm\.weight$", r"\1_norm.scale", k)] = v
    return out


def stack_rows(state: Mapping[str, Tensor], stacks: Sequence[tuple[str, tuple[str, ...], str]]) -> dict[str, Tensor]:
    """Projections the original runs as one Linear: per ``(pattern, parts, stacked)``, the ``parts``' weights
    (and biases) of each block ``pattern`` matches become ``stacked = [W_1; W_2; ...]`` (rows stacked, in order)."""
    flat = dict(state)
    for pattern, parts, stacked in stacks:
        for key in [k for k in flat if re.match(pattern, k)]:
            block = re.match(pattern, key).group(1)
            tail = key[len(block) + len(parts[0]):]  # ".weight" / ".bias"
            flat[block + stacked + tail] = torch.cat([flat.pop(block + p + tail) for p in parts], dim=0)
    return flat


def swap_halves(v: Tensor) -> Tensor:
    """``[a; b] -> [b; a]`` along the rows: an adaLN projection's ``(scale, shift)`` (diffusers) <-> ``(shift,
    scale)`` (BFL, SAI). Its own inverse."""
    return torch.cat(v.chunk(2, dim=0)[::-1])


SD3_MLP = {"linear_1": "0", "linear_2": "2"}
# One MMDiT block: diffusers' image stream is SAI's ``x_block``, its text stream the ``context_block``.
SD3_BLOCK = {"attn.qkv": "x_block.attn.qkv", "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.to_out.0": "x_block.attn.proj", "attn.add_qkv": "context_block.attn.qkv",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn.to_add_out": "context_block.attn.proj", "attn2.qkv": "x_block.attn2.qkv",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
             "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
             "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
             "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
             "ff_context.net.2": "context_block.mlp.fc2"}
SD3_RULES: list[Rule] = [
    (r"pos_embed\.pos_embed$", _fixed("pos_embed"), {}),
    (r"pos_embed\.proj\.", _fixed("x_embedder.proj."), {}),
    (r"time_text_embed\.timestep_embedder\.", _fixed("t_embedder.mlp."), SD3_MLP),
    (r"time_text_embed\.text_embedder\.", _fixed("y_embedder.mlp."), SD3_MLP),
    (r"context_embedder\.", _fixed("context_embedder."), {}),
    (r"proj_out\.", _fixed("final_layer.linear."), {}),
    (r"norm_out\.linear\.", _fixed("final_layer.adaLN_modulation.1."), {}),  # halves swapped in mmdit_to_single_file
    (r"transformer_blocks\.(\d+)\.", lambda g, c: f"joint_blocks.{g[0]}.", SD3_BLOCK),
]
SD3_STACKS = (*FLUX_STACKS[:2], (r"(transformer_blocks\.\d+\.attn2\.)to_q\.", ("to_q", "to_k", "to_v"), "qkv"))
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."


def mmdit_to_single_file(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in Stability AI's MMDiT layout (``joint_blocks.i.x_block`` /
    ``context_block``), without ``UNET_PREFIX``: the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``.

    ``qkv = [W_q; W_k; W_v]`` per stream (and SD3.5 medium's second image attention ``attn2``), RMSNorm
    ``norm_q`` -> ``ln_q``, and the ``(scale, shift)`` rows of the final norm and of the last block's text-stream
    norm (its only modulation there, as the text stream ends in that block) swapped into SAI's ``(shift, scale)``."""
    converted = convert(stack_rows(state, SD3_STACKS), SD3_RULES, {})
    last = max(int(k.split(".")[1]) for k in converted if k.startswith("joint_blocks."))
    swapped = ("final_layer.adaLN_modulation.1.", f"joint_blocks.{last}.context_block.adaLN_modulation.1.")
    return {k: swap_halves(v) if k.startswith(swapped) else v for k, v in converted.items()}


def sd3_to_single_file(transformer: Mapping[str, Tensor], vae: Mapping[str, Tensor], clip_l: Mapping[str, Tensor],
                       clip_g: Mapping[str, Tensor], t5: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """An SD3 / SD3.5 pipeline as Stability AI's single files hold it (sd3_medium_incl_clips*.safetensors): the MMDiT
    under ``UNET_PREFIX``, the VAE under ``VAE_PREFIX``, and the text encoders with transformers' own keys under
    ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (T5 only where the pipeline has one). T5's tied
    ``encoder.embed_tokens`` is written beside ``shared`` as a copy, as released (diffusers' reader loads both)."""
    text = {**{SD3_CLIP_L_PREFIX + k: v for k, v in clip_l.items() if not k.endswith("position_ids")},
            **{SD3_CLIP_G_PREFIX + k: v for k, v in clip_g.items() if not k.endswith("position_ids")},
            **{SD3_T5_PREFIX + k: v.clone() if k == "encoder.embed_tokens.weight" else v for k, v in (t5 or {}).items()}}
    mmdit = {UNET_PREFIX + k: v for k, v in mmdit_to_single_file(transformer).items()}
    return {**mmdit, **vae_to_single_file(vae), **text}


def to_single_file(unet: Mapping[str, Tensor], vae: Mapping[str, Tensor], text_encoder: Mapping[str, Tensor],
                   layers_per_block: int, open_clip: bool,
                   text_encoder_2: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """The networks of an SD 1.x (``open_clip=False``) or 2.x pipeline as one single-file state dict; with
    ``text_encoder_2``, SDXL's: ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (OpenCLIP bigG) under the
    ``conditioner.embedders`` prefixes (``open_clip`` is then moot)."""
    if text_encoder_2 is None:
        text = clip_to_single_file(text_encoder, open_clip)
    else:
        text = {**clip_to_single_file(text_encoder, False, SDXL_CLIP_PREFIX),
                **clip_to_single_file(text_encoder_2, True, SDXL_OPEN_CLIP_PREFIX)}
    return {**unet_to_single_file(unet, layers_per_block), **vae_to_single_file(vae), **text}


# ----------------------------------------------------------------------------------------------
# Detection: which released layout a file's keys are


@dataclass(frozen=True)
class Layout:
    """A released single-file layout: the diffusers class that reads it, and the hub repo whose folder
    layout its ``config=`` must have. ``network``: files holding only the denoiser (Flux's releases), loaded
    as that class and put into the config folder's pipeline."""

    name: str
    pipeline: str
    config_repo: str
    network: Optional[str] = None
    skip: str = "'*.safetensors' '*.bin' '*.ckpt'"  # what a config folder need not hold (hf download --exclude)


SD1 = Layout("SD 1.x", "StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5")
SD2 = Layout("SD 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1")  # -2-1-base: 512 px, epsilon
SDXL = Layout("SDXL", "StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0")
# Flux files hold the transformer only: the folder also brings the text encoders' and VAE's weights.
FLUX_DEV = Layout("Flux.1-dev", "FluxPipeline", "black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel",
                  "'transformer/*' 'flux1-*' 'ae.*'")
FLUX_SCHNELL = Layout("Flux.1-schnell", "FluxPipeline", "black-forest-labs/FLUX.1-schnell", "FluxTransformer2DModel",
                      "'transformer/*' 'flux1-*' 'ae.*'")
# SD3 files hold the MMDiT and VAE, with or without the text encoders: the folder brings those the file lacks.
SD3_MEDIUM = Layout("SD3 medium", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3-medium-diffusers",
                    skip="'transformer/*' 'sd3*'")
SD35_MEDIUM = Layout("SD3.5 medium", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium",
                     skip="'transformer/*' 'sd3*'")
SD35_LARGE = Layout("SD3.5 large", "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large",
                    skip="'transformer/*' 'sd3*'")
LAYOUTS = (SD1, SD2, SDXL, FLUX_DEV, FLUX_SCHNELL, SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE)
# Top-level prefixes of the original layouts: a file with such keys and no known layout is refused by name.
ORIGINAL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.", "double_blocks.", "single_blocks.",
                     "joint_blocks.", "text_encoders.")


def detect_layout(keys: Collection[str]) -> Optional[Layout]:
    """The layout of a state dict from characteristic keys (None: not a layout pgraft reads).

    Flux: ``double_blocks.0.img_attn.qkv.weight`` (bare or under ``model.diffusion_model.``), dev when the
    guidance embedding ``guidance_in`` is there; SD3: ``joint_blocks.0.x_block.attn.qkv.weight``, 3.5 medium with
    the second image attention (``x_block.attn2``), 3.5 large with q/k RMSNorms (``ln_q``) alone, SD3 medium with
    neither (bare keys: the MMDiT alone, loaded into the folder's pipeline); SDXL: the OpenCLIP-bigG ``conditioner.embedders.1.model.*``
    or the UNet's ``label_emb`` (the time ids); SD 2.x / 1.x: the UNet with an OpenCLIP / OpenAI CLIP encoder.
    """
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    for root in ("", UNET_PREFIX):
        if root + "double_blocks.0.img_attn.qkv.weight" in keys:
            return FLUX_DEV if has(root + "guidance_in.") else FLUX_SCHNELL
        if root + "joint_blocks.0.x_block.attn.qkv.weight" in keys:
            layout = (SD35_MEDIUM if any(".x_block.attn2." in k for k in keys) else
                      SD35_LARGE if any(".attn.ln_q." in k for k in keys) else SD3_MEDIUM)
            return replace(layout, network="SD3Transformer2DModel") if root == "" else layout
    if has("conditioner.embedders.1.model.") or has(UNET_PREFIX + "label_emb."):
        return SDXL
    if has(UNET_PREFIX + "input_blocks.0.0."):
        if has(OPEN_CLIP_PREFIX):
            return SD2
        if has("cond_stage_model.transformer."):
            return SD1
    return None


def looks_original(keys: Collection[str]) -> bool:
    return any(k.startswith(ORIGINAL_PREFIXES) for k in keys)
