#!/usr/bin/env python
"""Real size on the CPU: peak RSS and seconds of ``pgraft`` against diffusers at SD2 and SDXL size.

Each pipeline is built from its released configuration values (written out below, nothing is
downloaded) with random weights; the tokenizers are tiny byte-level CLIP tokenizers (77 tokens),
the text encoders are at their real size. Rows, each in a fresh subprocess so peak RSS is its own:

* ``sample N`` (N = 1 and 8): ``pgraft``'s sample stage (``run_sample``, one lane of N) against
  ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with the same steps and guidance;
* ``LoRA step``: LoRA fine-tuning steps of ``pgraft``'s finetune stage against a plain diffusers
  LoRA training step (``train_text_to_image_lora`` style: noise, timesteps, ``unet(...)``, MSE,
  backward, AdamW step), the same adapter targets, rank and batch, latents given (no VAE encode).
  Both time steps only: setup and a warm-up step are outside the clock on both sides.

SDXL is built and timed for diffusers; pgraft's row says what loading it answers (SDXL support
comes with the families work). ``bench/gpu.py`` runs the same builders on a GPU.

    python bench/real_size.py                                   # SD2 and SDXL, 512 px, 2 steps
    python bench/real_size.py --sizes sd2 --resolution 256 --steps 2 --json out.json
    python bench/real_size.py --sizes tiny --resolution 32      # the smoke test's size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photograph of an astronaut riding a horse"
TEXT_TOKENS = 77

# stabilityai/stable-diffusion-2-1-base: unet/config.json, vae/config.json, text_encoder/config.json
SD2 = {
    "unet": dict(act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
                 mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, use_linear_projection=True),
    "vae": dict(block_out_channels=[128, 256, 512, 512], latent_channels=4, layers_per_block=2, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                scaling_factor=0.18215),
    "text": [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu")],
}
# stabilityai/stable-diffusion-xl-base-1.0: unet, vae, text_encoder (CLIP ViT-L), text_encoder_2 (bigG)
SDXL = {
    "unet": dict(act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
                 out_channels=4, layers_per_block=2, norm_num_groups=32, projection_class_embeddings_input_dim=2816,
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True),
    "vae": dict(SD2["vae"], scaling_factor=0.13025),
    "text": [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
             dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")],
}
# The smoke test's size: SD2's layout, a few thousand parameters per block.
TINY = {
    "unet": dict(SD2["unet"], attention_head_dim=[2, 4, 4, 4], block_out_channels=[8, 16, 16, 16], layers_per_block=1,
                 norm_num_groups=4, cross_attention_dim=32),
    "vae": dict(SD2["vae"], block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
    "text": [dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, projection_dim=32,
                  hidden_act="gelu")],
}
# SDXL's layout at the smoke test's scale: two encoders (the second's pooled projection), six time ids.
TINY_XL = {
    "unet": dict(SDXL["unet"], attention_head_dim=[2, 4, 4], block_out_channels=[8, 16, 16], layers_per_block=1,
                 norm_num_groups=4, cross_attention_dim=64, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=8 * 6 + 32, transformer_layers_per_block=[1, 1, 1]),
    "vae": TINY["vae"],
    "text": [TINY["text"][0], dict(TINY["text"][0], hidden_act="gelu")],
}
SIZES = {"sd2": SD2, "sdxl": SDXL, "tiny": TINY, "tiny-sdxl": TINY_XL}


def tiny_tokenizer(folder: Path) -> Any:
    """A CLIP tokenizer over printable ASCII (no merges): offline, and any prompt tokenizes."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_TOKENS)


def build_pipeline(size: str, folder: Path, resolution: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight pipeline folder of ``size`` (once; a folder already there is reused)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec, tokenizer = SIZES[size], tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU where there is one: seconds, not minutes
        unet = UNet2DConditionModel(**spec["unet"], sample_size=resolution // 8)
        vae = AutoencoderKL(**spec["vae"], in_channels=3, out_channels=3, sample_size=resolution)
        ids = dict(vocab_size=len(tokenizer), max_position_embeddings=TEXT_TOKENS, bos_token_id=len(tokenizer) - 2,
                   eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
        encoders = [CLIPTextModel(CLIPTextConfig(**spec["text"][0], **ids))]
        if len(spec["text"]) > 1:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1], **ids)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=encoders[0], tokenizer=tokenizer)
    if len(encoders) > 1:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype).save_pretrained(folder, safe_serialization=True)
    return folder


class NoBar:
    """pgraft's stages report progress to a bar; a benchmark has none."""

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def advance(self, *a: Any, **k: Any) -> None:
        pass


class StepClock(NoBar):
    """A bar that reads the clock at the end of step ``start`` and of step ``stop`` (a GPU synchronized
    there), so a stage's steps are timed without its setup."""

    def __init__(self, start: int, stop: int, device: str) -> None:
        self.start, self.stop, self.device, self.done, self.marks = start, stop, device, 0, []

    def advance(self, *a: Any, **k: Any) -> None:
        self.done += 1
        if self.done in (self.start, self.stop):
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            self.marks.append(time.perf_counter())


def timed(run: Any, steps: int, device: str) -> float:
    """Seconds of ``run(steps)``: the row's own count where it returns a float (a stage timing its
    steps without its setup), else the wall clock around the call (a GPU synchronized)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    own = run(steps)
    sync()
    return own if isinstance(own, float) else time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# The rows: each returns a function of the step count that runs the measured work once


def pgraft_sample(folder: Path, num: int, device: str, dtype: torch.dtype, guidance: float = 7.5,
                  lane: int | None = None) -> Any:
    """pgraft's sample stage, all ``num`` images in one lane (the batch diffusers' pipeline runs)."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.sample import Conditions, run_sample

    model = load_model(str(folder)).to(device, dtype)

    def run(steps: int) -> None:
        cfg = SampleConfig(num=num, steps=steps, batch_size=num, lane=lane or num, guidance_scale=guidance)
        with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store:
            run_sample(model, cfg, Conditions(prompts=[PROMPT]), store, NoBar())
    return run


def diffusers_sample(folder: Path, num: int, device: str, dtype: torch.dtype, guidance: float = 7.5) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return lambda steps: pipe(PROMPT, num_images_per_prompt=num, num_inference_steps=steps, guidance_scale=guidance,
                              output_type="np", generator=torch.Generator().manual_seed(0))


def latents_shape(folder: Path, batch: int) -> tuple[int, ...]:
    config = json.loads((folder / "unet" / "config.json").read_text())
    return (batch, config["in_channels"], config["sample_size"], config["sample_size"])


def pgraft_lora(folder: Path, batch: int, device: str, dtype: torch.dtype, rank: int = 16) -> Any:
    """pgraft's finetune stage on random latents (float32 master weights, ``dtype`` autocast; the
    frozen layers held in ``dtype`` while training). ``run(steps)`` runs the stage for ``steps + 1``
    steps and returns the seconds of the last ``steps``: the stage's setup (run store, optimizer,
    accelerate, weights file) and its first step are outside, as the plain loop's setup and warm-up are."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import FinetuneConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.finetune import KeptSet, run_finetune

    y = torch.randn(latents_shape(folder, 4 * batch), generator=torch.Generator().manual_seed(0))
    kept = KeptSet(y=y, t_c=0.0, x0=y, prompts=[PROMPT] * len(y))
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")

    model = load_model(str(folder)).to(device)  # the first run adds the adapter; later runs go on training it

    def run(steps: int) -> float:
        cfg = FinetuneConfig(steps=steps + 1, batch_size=batch, lora_rank=rank, mixed_precision=precision,
                             checkpoint_every=10**6, max_grad_norm=1.0)
        clock = StepClock(1, steps + 1, device)
        with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store:
            run_finetune(model, kept, cfg, store, clock)
        return clock.marks[1] - clock.marks[0]
    return run


def diffusers_lora(folder: Path, batch: int, device: str, dtype: torch.dtype, rank: int = 16) -> Any:
    """The plain loop of diffusers' ``train_text_to_image_lora.py``: frozen weights in ``dtype``, the
    adapter in float32, autocast; pgraft's adapter targets (``add_lora``'s) so both train as much."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    from pgraft_cli.models.lora import LORA_TARGETS

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype).to(device).requires_grad_(False)
    encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype).to(device).requires_grad_(False)
    xl = unet.config.addition_embed_type == "text_time"
    if xl:  # SDXL: the second encoder's states beside the first's, its pooled projection, and the time ids
        from transformers import CLIPTextModelWithProjection

        encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"), torch_dtype=dtype).to(
            device).requires_grad_(False)
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names or any(n.endswith("." + t) for n in names)]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ids = torch.full((batch, TEXT_TOKENS), encoder.config.eos_token_id, device=device)
    latents = torch.randn(latents_shape(folder, batch), generator=torch.Generator().manual_seed(0)).to(device)
    unet.train()

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            first, extra = encoder(ids, output_hidden_states=xl), None
            states = first[0]
            if xl:  # the penultimate states of both encoders, as StableDiffusionXLPipeline.encode_prompt
                second = encoder_2(ids, output_hidden_states=True)
                states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
                size = latents.shape[-1] * 8
                extra = {"text_embeds": second.text_embeds,
                         "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=states.dtype)}
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, states, added_cond_kwargs=extra,
                        return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run(steps: int) -> None:
        for _ in range(steps):
            step()
    run.step = step  # type: ignore[attr-defined]
    return run


ROWS = {"pgraft sample": pgraft_sample, "diffusers sample": diffusers_sample,
        "pgraft LoRA step": pgraft_lora, "diffusers LoRA step": diffusers_lora}


# ----------------------------------------------------------------------------------------------
# The CPU benchmark: one subprocess per row


def child(args: argparse.Namespace) -> None:
    """One row in this process: build, warm up (1 step), time ``--steps`` steps; JSON on stdout."""
    folder, dtype = Path(args.folder), getattr(torch, args.dtype)
    n = args.num
    try:
        run = ROWS[args.row](folder, n, "cpu", dtype)
        run(1)
        out = {"seconds": timed(run, args.steps, "cpu")}
    except Exception as e:  # noqa: BLE001 - a row that cannot run says why (e.g. SDXL before its adapter)
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["sd2", "sdxl"], choices=list(SIZES))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="sampler steps (sample rows) / training steps (LoRA rows)")
    p.add_argument("--nums", type=int, nargs="+", default=[1, 8], help="images per sample row")
    p.add_argument("--batch", type=int, default=1, help="LoRA training batch")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cache", type=Path, default=None, help="where the built pipelines are kept (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--num", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        return child(args)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="pgraft-real-size-"))
    results = []
    print(f"{'size':<6}{'row':<22}{'N':>4}{'seconds':>10}{'peak RSS GB':>13}  note")
    for size in args.sizes:
        folder = build_pipeline(size, cache / f"{size}-{args.resolution}", args.resolution)
        for row in ROWS:
            for n in args.nums if "sample" in row else [args.batch]:
                cmd = [sys.executable, __file__, "--row", row, "--folder", str(folder), "--num", str(n),
                       "--steps", str(args.steps), "--dtype", args.dtype]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = proc.stdout.strip().splitlines()
                r = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr.strip()[-160:]}
                results.append({"size": size, "row": row, "n": n, "resolution": args.resolution, "steps": args.steps, **r})
                secs = f"{r['seconds']:.2f}" if "seconds" in r else "-"
                print(f"{size:<6}{row:<22}{n:>4}{secs:>10}{r.get('peak_rss_gb', float('nan')):>13.2f}  {r.get('error', '')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
