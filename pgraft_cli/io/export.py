"""Writers for ``pgraft export``: a loaded model as files other tools read, without pgraft.

- ``diffusers``: a pipeline folder. One network (a plain model, or GRAFT at cutoff 0 with the LoRA
  fused) is the family's own stock pipeline (``SUPPORT``) whose scheduler is set to pgraft's grid
  (``stock_scheduler``); anything composed (a noise corrector, unconditioned or text-conditioned; P-GRAFT's
  tuned network above a cutoff), and any pixel UNet, is ``PgraftPipeline`` (``export_pipeline.py``, copied
  into the folder as ``pipeline.py``), for every family pgraft runs (Flux included).
- ``lora``: the adapter as diffusers' ``load_lora_weights`` reads it (``pytorch_lora_weights.safetensors``,
  ``unet.``/``transformer.`` prefixed peft keys, alpha in the adapter metadata), or kohya's layout
  (``lora_unet_...lora_down/lora_up/alpha``; SDXL with the original UNet's module names) that ComfyUI and
  A1111 read.
- ``single-file``: SD 1.x/2.x/SDXL and SD3/SD3.5 as one ``model.safetensors`` in the original CompVis/SAI key
  layout (``single_file.py``), the network fused; Flux.1 as Black Forest Labs' files are, the fused transformer
  alone (bare ``double_blocks.*`` keys); composed samplers cannot be one file and are refused.

Every writer takes the weights' ``dtype`` (pgraft export --dtype); a noise corrector keeps its own.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import OutputPathError, PgraftError
from ..models.corrector import NoiseCorrector
from ..models.loaded import LoadedModel
from ..models.lora import LORA_ADAPTER, lora_state
from .checkpoints import _quiet_loading, build_network, named_family
from .runstore import USUAL_FILE_MODE
from .single_file import detect_layout, flux_to_single_file, sd3_to_single_file, to_single_file, unet_names

FORMATS = ("diffusers", "lora", "single-file")
LORA_LAYOUTS = ("diffusers", "kohya")
TEMPLATE = Path(__file__).with_name("export_pipeline.py")
KOHYA_FILE = "lora_kohya.safetensors"
SINGLE_FILE = "model.safetensors"
SINGLE_FILE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
EXPORT_INFO = "pgraft_export.json"


@dataclass(frozen=True)
class Support:
    """What ``pgraft export`` writes for one model family (``Family.name``).

    ``lora``: the key prefix the family pipeline's ``load_lora_weights`` reads (None: it has none);
    ``plain``: one network is the family's own diffusers pipeline (otherwise, and for anything composed,
    ``PgraftPipeline``, which runs every family)."""

    lora: Optional[str]
    plain: bool


SUPPORT = {"unet2d": Support(None, False), "sd": Support("unet", True), "sdxl": Support("unet", True),
           "sd3": Support("transformer", False), "flux": Support("transformer", True), "pixart": Support(None, True),
           "dit": Support(None, True)}


def support_of(model: LoadedModel) -> Support:
    return SUPPORT[model.adapter.name]


class ExportError(PgraftError):
    """The checkpoint cannot be written in the asked format, or --out is in the way."""


# ----------------------------------------------------------------------------------------------
# The output folder


@contextlib.contextmanager
def output_folder(out: Path, force: bool) -> Iterator[Path]:
    """A fresh folder to write into, moved onto ``out`` only when everything was written.

    An existing non-empty ``out`` is refused without ``force``; with it, it is replaced at the end.
    """
    out = Path(out).expanduser().absolute()  # "." has no name: its temporary folder would land inside it
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file, but a folder is expected; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputPathError(f"--out {out} is not empty; pass a new folder, or --force to replace it")
    tmp = out.parent / f".{out.name}.pgraft-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):  # save_pretrained's weights come out 0600 (safetensors' save_file): the usual mode
        if path.is_file():
            path.chmod(USUAL_FILE_MODE)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ----------------------------------------------------------------------------------------------
# Networks without pgraft's adapter


def without_adapter(network: nn.Module, model: LoadedModel, fuse: bool) -> nn.Module:
    """A fresh copy of ``network`` with the LoRA adapter merged in (``fuse``) or dropped.

    ``W' = W + (alpha / r) B A`` per adapted layer (peft's merge); the copy has the stock key layout.
    """
    if not model.lora:
        return network
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(network)
    if fuse:
        for module in work.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
                module.merge(adapter_names=[LORA_ADAPTER])
    state = {k.replace(".base_layer.", "."): v for k, v in work.state_dict().items() if "lora_" not in k}
    clean = build_network(model.model_class, model.model_config)
    clean.load_state_dict(state, strict=True)
    return clean.to(model.dtype).eval().requires_grad_(False)


def tuned_network(model: LoadedModel) -> nn.Module:
    """The network that runs above the cutoff, as one stock network."""
    return model.tuned if model.tuned is not None else without_adapter(model.network, model, fuse=True)


def base_network(model: LoadedModel) -> nn.Module:
    return without_adapter(model.network, model, fuse=False)


# ----------------------------------------------------------------------------------------------
# diffusers


def one_network(model: LoadedModel) -> bool:
    """Whether sampling runs one network all the way: no corrector, and any fine-tune at cutoff 0
    with guidance applied as to the base (``tuned_guidance`` is moot where nothing is guided)."""
    if model.corrector is not None:
        return False
    if not model.finetuned:
        return True
    return model.cutoff <= 0 and (model.tuned_guidance == "reapply" or not model.guided)


def _trailing_ddim(scheduler_config: dict[str, Any]) -> Any:
    """DDIMScheduler on pgraft's diffusion grid: trailing timesteps, t = 0 clean (alpha = 1), no clipping."""
    from diffusers import DDIMScheduler

    keep = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return DDIMScheduler.from_config({**keep, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                                      "clip_sample": False, "thresholding": False, "steps_offset": 0})


def _scheduler(model: LoadedModel) -> Any:
    import diffusers

    config = dict(model.scheduler_config)
    is_flow_class = named_family(config) == "flow"
    if model.family == "flow" and not is_flow_class:  # --kind flow on a DDPM config: a plain flow, shift 1
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=model.schedule.num_train_timesteps)
    if model.family == "diffusion" and is_flow_class:
        raise ExportError(f"{model.source} was loaded with --kind diffusion over a flow scheduler; export it as the "
                          f"flow it is (drop --kind)")
    if model.family == "diffusion":
        return _trailing_ddim(config)
    return getattr(diffusers, config["_class_name"]).from_config(config)


def export_diffusers(model: LoadedModel, out: Path, keep_adapter: bool = False, dtype: Optional[torch.dtype] = None,
                     guidance: float = 1.0, autocast: Optional[str] = None) -> dict[str, Any]:
    """Write the pipeline folder (see the module doc); returns what was written. ``guidance``: the scale
    pgraft samples at, the composed pipeline's default, noted in ``pgraft_export.json``; ``autocast``: the
    recipe's ``model.autocast``, which the composed pipeline applies as pgraft sample does."""
    if model.corrector is not None and model.corrector.kind == "mlp":
        raise ExportError(f"--format diffusers cannot write {model.source}: its corrector is the mlp kind, which the "
                          f"exported pipeline does not carry; sample it with pgraft sample, or correct the base with "
                          f"correct.corrector = \"flow\" or \"gaussian\" to export it")
    if model.corrector is not None and model.corrector.network is not None and model.corrector.mean is not None:
        raise ExportError(f"--format diffusers cannot write {model.source}: its corrector flow starts from a Gaussian "
                          f"source, which the exported pipeline does not carry; sample it with pgraft sample, or "
                          f"correct the base with correct.corrector_source = \"normal\" to export it")
    # a --kind against the scheduler's own family: the stock pipeline would drive the config's scheduler, not
    # the one pgraft samples with; the composed pipeline takes pgraft's (``_scheduler``, which refuses the other way)
    own_kind = named_family(model.scheduler_config) == model.family
    plain = one_network(model) and support_of(model).plain and model.pipeline is not None and own_kind
    if keep_adapter and not (model.lora and one_network(model) and model.conditioning == "text"):
        raise ExportError("--keep-adapter needs a LoRA fine-tune at cutoff 0 of a text pipeline (the result of one "
                          "network that diffusers' load_lora_weights can take); drop --keep-adapter")
    with _quiet_loading():
        if plain:
            network = base_network(model) if keep_adapter else tuned_network(model) if model.finetuned else model.network
            pipe = _plain_pipeline(model, network)
        else:
            pipe = _pgraft_pipeline(model, guidance, autocast)
        for name, part in pipe.components.items():  # the corrector keeps its dtype, as in pgraft sample
            if isinstance(part, nn.Module) and name != "corrector":
                part.to(dtype or model.dtype)
        pipe.save_pretrained(out, safe_serialization=True)
    written = {"pipeline": type(pipe).__name__, **_guidance_info(model, pipe, plain, guidance, out)}
    if keep_adapter:
        written["lora"] = export_lora(model, out, dtype=dtype)["file"]
    if not plain:
        shutil.copyfile(TEMPLATE, out / "pipeline.py")
        index = json.loads((out / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", "PgraftPipeline"]
        corrector = pipe.components.get("corrector")
        if corrector is not None and type(corrector).__name__ != "UNet2DModel":  # a custom component: its class beside it
            shutil.copyfile(TEMPLATE, out / "corrector" / "pipeline.py")
            index["corrector"] = ["pipeline", type(corrector).__name__]
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        written["custom_pipeline"] = "pipeline.py"
    return written


def _plain_pipeline(model: LoadedModel, network: nn.Module) -> Any:
    """The family's own pipeline class with ``network`` and a scheduler on pgraft's grid (``stock_scheduler``)."""
    parts = dict(model.pipeline.components)
    parts.update({"transformer" if "transformer" in parts else "unet": network, "scheduler": stock_scheduler(model)})
    return type(model.pipeline)(**parts)


def stock_scheduler(model: LoadedModel) -> Any:
    """pgraft's grid in a stock pipeline, for every step count N. Diffusion: DPM-Solver++ of order 1, which is
    DDIM (``x' = alpha' x0 + sigma' e``), on the trailing timesteps ``round(T - k T / N) - 1`` then alpha = 1;
    diffusers' DDIMScheduler steps to ``t - T // N`` instead, off pgraft's grid whenever N does not divide T.
    Flow: the model's own scheduler (the family pipeline sets its shift)."""
    import diffusers

    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    if model.family == "flow":
        return getattr(diffusers, model.scheduler_config["_class_name"]).from_config(config)
    return diffusers.DPMSolverMultistepScheduler.from_config(
        {**config, "solver_order": 1, "algorithm_type": "dpmsolver++", "timestep_spacing": "trailing",
         "final_sigmas_type": "zero", "thresholding": False, "steps_offset": 0, "lower_order_final": True,
         "use_karras_sigmas": False, "variance_type": None})


def _sampled_guidance(model: LoadedModel, guidance: float) -> float:
    """The guidance scale pgraft samples at: ``guidance`` where the model is guided, or where a guidance-distilled
    network (Flux dev) takes it as an input; else 1."""
    return guidance if model.guided or model.distilled else 1.0


def _guidance_info(model: LoadedModel, pipe: Any, plain: bool, guidance: float, out: Path) -> dict[str, Any]:
    """``pgraft_export.json``: the guidance scale pgraft samples at (a guidance-distilled network's guidance
    input); a stock pipeline's own default beside it, in a note."""
    scale = _sampled_guidance(model, guidance)
    info: dict[str, Any] = {"guidance_scale": scale}
    default = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    if plain and default is not None and default.default != scale:
        info["note"] = (f"{type(pipe).__name__} defaults to guidance_scale={default.default:g}; pgraft samples at "
                        f"{scale:g} (pass guidance_scale={scale:g})")
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return info


def _pgraft_pipeline(model: LoadedModel, guidance: float, autocast: Optional[str]) -> Any:
    from .export_pipeline import TEXT_PARTS, PgraftPipeline

    pipe = model.pipeline
    parts = {k: getattr(pipe, k) for k in TEXT_PARTS if getattr(pipe, k, None) is not None}
    if model.conditioning == "text" and "text_encoder" not in parts:
        raise ExportError(f"{model.source}: the composed pipeline encodes prompts with the pipeline's text_encoder, "
                          f"which {type(pipe).__name__} lacks; sample it with pgraft sample")
    corrector = model.corrector
    if corrector is not None and corrector.conditioning == "class":
        raise ExportError(f"{model.source}'s noise corrector is conditioned on each sample's class, which the exported "
                          f"pipeline does not take; sample it with pgraft sample, or export its base")
    component = _corrector_component(corrector)
    own = None if component is None or type(component).__name__ == "GaussianCorrector" else component.dtype
    return PgraftPipeline(
        unet=base_network(model), scheduler=_scheduler(model), guidance_scale=_sampled_guidance(model, guidance),
        tuned_unet=tuned_network(model) if model.finetuned else None, corrector=component, **parts,
        autocast=autocast, corrector_dtype=None if own is None else str(own).removeprefix("torch."),
        cutoff=float(model.cutoff), tuned_guidance=model.tuned_guidance,
        corrector_steps=corrector.steps if corrector is not None else 0,
        corrector_sampler=corrector.sampler if corrector is not None else "euler",
        base_steps=corrector.base_steps if corrector is not None else None, null_class=model.null_class,
        family=model.adapter.name, force_zeros_for_empty_prompt=bool(
            getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", True)),
        text_pipeline=type(pipe).__name__ if model.conditioning == "text" else None,
        corrector_guidance=None if corrector is None else corrector.guidance_scale)


def _corrector_component(corrector: Optional[NoiseCorrector]) -> Optional[nn.Module]:
    """The corrector as a pipeline component: an unconditioned flow's UNet2DModel itself; a Gaussian as
    ``GaussianCorrector`` (a text-conditioned one with its mean's ridge ``weight``); a text-conditioned flow as
    ``TextFlowCorrector`` (its network and the pooled embedding's projection)."""
    from .export_pipeline import GaussianCorrector, TextFlowCorrector

    if corrector is None:
        return None
    text = corrector.conditioning == "text"
    if corrector.network is None:
        diagonal = corrector.kind == "gaussian-diag"
        values = {"mean": corrector.mean, "scale": corrector.std if diagonal else corrector.chol,
                  **({"weight": corrector.weight} if text else {})}
        network = GaussianCorrector(corrector.mean.numel(), diagonal, corrector.weight.shape[0] if text else 0)
        network.load_state_dict({k: GaussianCorrector.bits(v) for k, v in values.items()})
        return network
    if not text:
        return corrector.network
    projection = corrector.projection
    config = {k: v for k, v in corrector.network.config.items() if not k.startswith("_")}
    network = TextFlowCorrector(config, projection.in_features, projection.out_features)
    network.network.load_state_dict(corrector.network.state_dict())
    network.projection.load_state_dict(projection.state_dict())
    return network.to(next(corrector.network.parameters()).dtype).eval()


# ----------------------------------------------------------------------------------------------
# LoRA


def _lora_prefix(model: LoadedModel) -> str:
    """``unet`` or ``transformer``: the family pipeline's key prefix (``SUPPORT``); refused where it cannot load one."""
    prefix = support_of(model).lora
    if prefix is None:  # (diffusers' UNet2DModel has no load_lora_adapter either)
        holder = type(model.pipeline).__name__ if model.pipeline is not None else model.model_class
        raise ExportError(f"--format lora: {holder} has no load_lora_weights to read it; "
                          f"export --format diffusers (the LoRA fused) instead")
    return prefix


def _save_lora(model: LoadedModel, out: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``save_lora_weights`` of the family's pipeline class."""
    prefix = _lora_prefix(model)
    type(model.pipeline).save_lora_weights(out, **{f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": meta})


def export_lora(model: LoadedModel, out: Path, layout: str = "diffusers",
                dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """Write the adapter in diffusers' (or kohya's) layout; returns the file and a note on the cutoff."""
    if layout not in LORA_LAYOUTS:
        raise ExportError(f"--lora-format {layout!r} is unknown; use {' or '.join(LORA_LAYOUTS)}")
    if not model.lora:
        other = "--format diffusers" + (" or single-file" if type(model.pipeline).__name__ in SINGLE_FILE_PIPELINES else "")
        raise ExportError(f"{model.source} holds no LoRA adapter (a full fine-tune or a plain model); export it with "
                          f"{other}")
    config = model.network.peft_config[LORA_ADAPTER]
    dtype = dtype or model.dtype
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state(model.network).items()}
    prefix = _lora_prefix(model)
    if layout == "kohya":
        if model.model_class != "UNet2DConditionModel":
            raise ExportError(f"--lora-format kohya is for Stable Diffusion 1.x/2.x/XL UNets; {model.source} is a "
                              f"{model.model_class}: use --lora-format diffusers")
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        kohya = convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in _kohya_names(model, state).items()})
        kohya = {k: torch.tensor(float(config.lora_alpha), dtype=dtype) if k.endswith(".alpha") else v for k, v in kohya.items()}
        save_file(kohya, str(out / KOHYA_FILE), metadata={"ss_network_dim": str(config.r),
                                                         "ss_network_alpha": str(config.lora_alpha)})
        file = out / KOHYA_FILE
    else:
        # The patterns, though empty, are written: diffusers 0.35.0 reads rank_pattern from any metadata it is given.
        meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
                "rank_pattern": {}, "alpha_pattern": {}}
        _save_lora(model, out, state, meta)
        file = out / "pytorch_lora_weights.safetensors"
    result = {"file": file.name, "layout": layout, "rank": config.r, "alpha": config.lora_alpha}
    if model.cutoff > 0:
        result["note"] = (f"the adapter was trained for t > {model.cutoff:g}; load_lora_weights applies it at every "
                          f"step, which is not the P-GRAFT sampler (export --format diffusers for that)")
    return result


def _kohya_names(model: LoadedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x adapters keep diffusers' module names (kohya trains those on the diffusers UNet); SDXL's take
    the original UNet's (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), as kohya trains SDXL on it."""
    config = model.network.config
    if config.get("addition_embed_type") != "text_time":
        return state
    if not isinstance(config.layers_per_block, int):
        raise ExportError(f"{model.source}: kohya's SDXL names need one layers_per_block for every block (got "
                          f"{config.layers_per_block}); use --lora-format diffusers")
    up_attention = {i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    try:
        return unet_names(state, config.layers_per_block, up_attention)
    except ValueError as e:
        raise ExportError(f"{model.source}: {e} (kohya's SDXL names); use --lora-format diffusers") from None


# ----------------------------------------------------------------------------------------------
# single file


def export_single_file(model: LoadedModel, out: Path, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """UNet (fine-tune fused), VAE and text encoder(s) of an SD 1.x/2.x/SDXL model as one ``model.safetensors``
    in the original key layout; SD 2.x (an OpenCLIP text encoder, GELU) gets the OpenCLIP text keys, SDXL
    its two embedders (CLIP-L, OpenCLIP bigG). SD3/SD3.5: the MMDiT (fine-tune fused), VAE, CLIP-L, CLIP-G and
    T5 (where the pipeline has it) as sd3_medium_incl_clips*.safetensors hold them. Flux: the transformer alone
    (fine-tune fused) in BFL's layout, as flux1-dev/schnell.safetensors hold it; the text encoders and VAE stay
    the config folder's."""
    from safetensors.torch import save_file

    pipe = model.pipeline
    kind = type(pipe).__name__ if pipe is not None else model.model_class
    if kind not in SINGLE_FILE_PIPELINES:
        raise ExportError(f"--format single-file supports Stable Diffusion 1.x/2.x/XL/3/3.5 and Flux.1 "
                          f"({', '.join(SINGLE_FILE_PIPELINES)}); {model.source} is a {kind}: use --format diffusers")
    if not one_network(model):
        why = "a noise corrector runs before the base model" if model.corrector is not None else (
            f"the tuned network runs above t = {model.cutoff:g} and the base below" if model.cutoff > 0 else
            "its tuned segment is sampled unguided (tuned_guidance = none)")
        raise ExportError(f"{model.source} cannot be one single file: {why}, which one set of weights cannot "
                          f"express; use --format diffusers (a pipeline folder that runs the composed sampler)")
    unet = tuned_network(model) if model.finetuned else model.network
    dtype = dtype or model.dtype

    def write(state: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, str(out / SINGLE_FILE))

    if kind == "FluxPipeline":
        write(flux_to_single_file(unet.state_dict()))
        dev = "dev" if unet.config.guidance_embeds else "schnell"
        return {"file": SINGLE_FILE, "layout": f"Flux.1-{dev} (BFL, transformer only)",
                "note": "the file holds the transformer alone, as Black Forest Labs' flux1-*.safetensors do: load it "
                        "with FluxTransformer2DModel.from_single_file and put it into a FluxPipeline whose text "
                        "encoders and VAE come from the base folder"}
    if kind == "StableDiffusion3Pipeline":
        return _write_sd3(pipe, unet, write)
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ExportError(f"{model.source}: the single-file layout needs one layers_per_block for every block (got "
                          f"{layers}); use --format diffusers")
    xl = kind == "StableDiffusionXLPipeline"
    open_clip = pipe.text_encoder.config.hidden_act == "gelu"  # OpenCLIP (SD 2.x); OpenAI CLIP is quick_gelu
    try:
        state = to_single_file(unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(), layers,
                               open_clip, pipe.text_encoder_2.state_dict() if xl else None)
    except ValueError as e:
        raise ExportError(f"{model.source}: {e}; use --format diffusers") from None
    write(state)
    layout = "SDXL (CLIP-L, OpenCLIP bigG)" if xl else "SD 2.x (OpenCLIP)" if open_clip else "SD 1.x (CLIP)"
    return {"file": SINGLE_FILE, "layout": layout}


def _write_sd3(pipe: Any, transformer: nn.Module, write: Any) -> dict[str, Any]:
    """SD3's file: its layout named as pgraft reads it back (SD3 medium, SD3.5 medium / large)."""
    t5 = pipe.text_encoder_3
    state = sd3_to_single_file(transformer.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(),
                               pipe.text_encoder_2.state_dict(), t5.state_dict() if t5 is not None else None)
    write(state)
    result = {"file": SINGLE_FILE, "layout": f"{detect_layout(state).name} (MMDiT, VAE, CLIP-L, CLIP-G"
                                             f"{', T5-XXL' if t5 is not None else ''})"}
    projection = pipe.text_encoder.text_projection.weight
    if not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype, device=projection.device)):
        # SAI's CLIP-L projects its pooled output by the identity; diffusers' reader (and ComfyUI) set it so.
        result["note"] = ("CLIP-L's text_projection is not the identity SD3 runs: diffusers' from_single_file and "
                          "ComfyUI replace it by the identity, which changes the pooled text embedding; "
                          "--format diffusers keeps it")
    return result
