"""The sample stage: draw images from a model into sharded, resumable run-store outputs.

Determinism contract: image ``i`` starts from noise seeded by ``(seed, i)`` and is computed inside
lane ``i // lane``, a fixed group of ``lane`` consecutive images that always goes through the
network together (the last lane is padded with the next images' noise, which is then dropped). So
an image depends only on the seed, its index and the recipe's sampler settings: never on ``num``,
``batch_size``, the shard it lands in, or how many ``accelerate`` processes share the work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..io.checkpoints import model_key
from ..io.host import release_free_memory
from ..errors import OutputPathError, PgraftError
from ..models.cross_attention import CACHE_BUDGET_BYTES, cross_attention_cache
from ..models.loaded import LoadedModel
from ..models.traced import TracedForward, traceable
from ..io.recipes import SampleConfig
from ..io.runstore import Dist, RunStore, atomic_write_bytes, atomic_write_text, stage_key
from ..core.samplers import sample as run_sampler

STAGE = "sample"


def noise_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index``: a hash of ``(seed, index)``, so streams never overlap."""
    digest = hashlib.sha256(f"pgraft-noise:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_noise(seed: int, indices: list[int], shape: tuple[int, ...]) -> Tensor:
    """N(0, I) noise for each image index, drawn on the CPU (identical on every device)."""
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i)))
    return out


class StageStopped(Exception):
    """A side-by-side shard told to stop (``side_by_side``'s ``stop``): the error or interrupt that set it
    is the one the caller sees; this one only ends the shard's thread early."""


def check_stop(stop: threading.Event, stage: str) -> None:
    """Raise ``StageStopped`` once ``stop`` is set (side-by-side work calls it at each step or network call)."""
    if stop.is_set():
        raise StageStopped(f"the {stage} stopped: other work side by side failed or the run was interrupted")


@dataclass
class Conditions:
    """What each image is conditioned on: a prompt per image, or a class per image, or nothing."""

    prompts: Optional[list[str]] = None
    class_label: Optional[int] = None

    def for_indices(self, model: LoadedModel, indices: list[int]) -> tuple[Optional[list[str]], Optional[list[int]]]:
        if model.conditioning == "text":
            prompts = self.prompts or [""]
            return [prompts[i % len(prompts)] for i in indices], None
        if model.conditioning == "class":
            n = model.num_classes or 1
            return None, [self.class_label if self.class_label is not None else i % n for i in indices]
        return None, None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_conditions(model: LoadedModel, cond: Conditions) -> None:
    if cond.prompts and model.conditioning != "text":
        raise PgraftError(f"--prompt was given but {model.source} is not text-conditioned ({model.conditioning}); drop --prompt")
    if cond.class_label is not None:
        if model.conditioning != "class":
            raise PgraftError(f"--class was given but {model.source} is not class-conditioned ({model.conditioning}); drop --class")
        if not 0 <= cond.class_label < (model.num_classes or 0):
            raise PgraftError(f"--class {cond.class_label} is out of range; the model has classes 0..{(model.num_classes or 1) - 1}")
    if model.conditioning == "text" and not cond.prompts:
        raise PgraftError(f"{model.source} is a text-to-image model; pass --prompt TEXT or --prompts FILE")


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1], (B, C, H, W) -> uint8 (B, H, W, C), rounding to nearest."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def png_bytes(image_hwc: np.ndarray) -> bytes:
    from PIL import Image

    array = image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SampleResult:
    run_dir: Path
    num: int
    shards: list[Path]
    generated: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 and self.generated else 0.0


AUTO_LANE = 16  # the most images per network call that lane = "auto" picks on a GPU (then capped by memory)
CPU_LANE = 64  # ... and on the CPU: 15-30 % more images/s than 16 on the bundled model (bench/cpu_lanes.py)


def choose_lane(num: int, batch_size: int, cap: int = AUTO_LANE) -> int:
    """The automatic lane: ``min(cap, num)``, so a small run pads nothing; with several shards the
    largest divisor of ``batch_size`` not above that, so no lane straddles two shards."""
    lane = max(1, min(cap, num, batch_size))
    if num > batch_size:
        lane = max(d for d in range(1, lane + 1) if batch_size % d == 0)
    return lane


def lane_cap(free: int, reserved: int, allocated: int, per_image: int) -> int:
    """``min(AUTO_LANE, (free + reserved - allocated) / 2 / per_image)``, at least 1: the device's free
    memory counts the blocks PyTorch holds but has not allocated (``mem_get_info`` does not)."""
    return max(1, min(AUTO_LANE, int((free + max(0, reserved - allocated)) // 2 // max(1, per_image))))


def memory_lane_cap(model: LoadedModel, guidance_scale: float) -> int:
    """How many images fit one network call on the model's GPU (:func:`lane_cap`, one image's peak
    measured by one call at batch 1, in the free memory less what reused cross-attention keys and
    values may hold: :func:`reused_cross_attention`). Off CUDA no memory cap: ``CPU_LANE``."""
    if model.device.type != "cuda":
        return CPU_LANE
    x = torch.zeros((1, *model.sample_shape), device=model.device, dtype=model.dtype)
    prompts, classes = Conditions(prompts=[""], class_label=0).for_indices(model, [0])
    torch.cuda.synchronize(model.device)
    before = torch.cuda.memory_allocated(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    with torch.inference_mode():
        model.predict(x, torch.tensor(1.0), model.encode(prompts, classes, guidance_scale))
    per_image = max(1, torch.cuda.max_memory_allocated(model.device) - before)
    free, _ = torch.cuda.mem_get_info(model.device)
    kept = CACHE_BUDGET_BYTES if model.adapter.reuses_cross_attention else 0  # the most reused keys, values hold
    reserved, allocated = torch.cuda.memory_reserved(model.device), torch.cuda.memory_allocated(model.device)
    return lane_cap(max(0, free - kept), reserved, allocated, per_image)


def agree_on_lane(cap: int, processes: int, device: torch.device) -> int:
    """Process 0's ``cap`` on every process of a stage split over ``processes`` (the shards' key holds the
    lane). A stage one process runs alone (finetune's evaluations, on the main process) calls no collective:
    the other processes would never join it (a hang under NCCL)."""
    if processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = torch.tensor([cap], device=device)
        torch.distributed.broadcast(shared, src=0)
        return int(shared.item())
    return cap


def resumed_lane(store: RunStore, name: str, config_for: Callable[[int], dict[str, Any]], inputs: dict[str, Any],
                 lane: int) -> int:
    """The automatic lane a stage runs at: the one its recorded shards were made with where the key this
    run would have at that lane (``config_for(lane)``: the lane and whatever follows from it) is
    theirs (free memory, which picks the lane, must never turn a resume into redoing finished shards),
    else ``lane``."""
    entry = store.read_manifest()["stages"].get(name) or {}
    old = (entry.get("config") or {}).get("lane")
    if isinstance(old, int) and old != lane and entry.get("key") == stage_key(name, config_for(old), inputs):
        return old
    return lane


def resolve_lane(model: LoadedModel, cfg: SampleConfig, processes: int = 1) -> SampleConfig:
    """``cfg`` with ``lane = "auto"`` replaced by the lane this run uses (a fixed lane is kept); a stage split
    over ``processes`` takes process 0's (:func:`agree_on_lane`)."""
    if cfg.lane != "auto":
        return cfg
    cap = agree_on_lane(memory_lane_cap(model, cfg.guidance_scale), processes, model.device)
    return replace(cfg, lane=choose_lane(cfg.num, cfg.batch_size, cap))


# The network classes whose forward runs faster with channels_last weights on the CPU (bench/RESULTS.md,
# "channels_last by default on the CPU"): UNet2DModel at every size measured, 1.2 M to 114 M parameters
# and 16 to 256 px (the digits UNet through the stage code; DDPM-CIFAR 32 px and DDPM-church 256 px
# configs 1.03-1.17x, bench/memory_format.py). Not UNet2DConditionModel (SD2 size 10 % slower), nor the
# corrector's small UNet or training (slower).
CHANNELS_LAST_FAMILIES = ("UNet2DModel",)


def reused_cross_attention(model: LoadedModel, enabled: bool = True) -> contextlib.AbstractContextManager[int]:
    """For a forward-only stage, the base and tuned networks' cross-attention keys and values computed
    once per conditioning (``models.cross_attention``: the same bytes) where the family passes the
    prompt's states to them as given (SD, SDXL); elsewhere nothing."""
    return cross_attention_cache((model.network, model.tuned), enabled and model.adapter.reuses_cross_attention)


def resolve_memory_format(model: LoadedModel, memory_format: str) -> str:
    """The layout ``sample.memory_format`` names: ``"auto"`` is ``"channels_last"`` on the CPU for a
    network class in ``CHANNELS_LAST_FAMILIES`` (a pixel UNet2DModel, measured faster from the 1.2 M
    parameter digits UNet at 16 px to a 114 M parameter DDPM UNet at 256 px), else ``"contiguous"``
    (SD2's UNet2DConditionModel measured 10 % slower; GPUs not measured); a fixed format is kept."""
    if memory_format != "auto":
        return memory_format
    fast = model.device.type == "cpu" and model.model_class in CHANNELS_LAST_FAMILIES
    return "channels_last" if fast else "contiguous"


@contextlib.contextmanager
def network_memory_format(model: LoadedModel, memory_format: str) -> Iterator[None]:
    """For a forward-only stage, the base and tuned networks' 4-D weights in ``memory_format``, and
    afterwards the very tensors they had before (training, and the stages after it, see the layout,
    the storage and the sharing they always had; a weight that was channels_last already is left alone).

    Only the weights move: a convolution runs channels_last when its weight is (oneDNN), and its
    output carries the layout on to the next layer, so the sampler's tensors need no conversion.
    Weights that are views of one tensor get one converted copy. The tensors taken are kept for the
    stage: a second copy of the converted weights, on the networks' device (float32: the digits UNet
    3.8 MB, a 256 px DDPM UNet2DModel 0.41 GB; SD2's UNet, where ``"channels_last"`` is asked for, 2.3 GB).
    """
    taken: list[tuple[Tensor, Tensor]] = []  # (weight, the data it had)
    if memory_format == "channels_last":
        copies: dict[tuple, Tensor] = {}
        nets = [net for net in (model.network, model.tuned) if net is not None]
        weights = {id(w): w for net in nets for w in (*net.parameters(), *net.buffers()) if w.dim() == 4}
        for w in weights.values():
            view = (w.untyped_storage().data_ptr(), w.storage_offset(), w.shape, w.stride(), w.dtype)
            if view not in copies:
                copies[view] = w.data.to(memory_format=torch.channels_last)  # as nn.Module.to converts
            if copies[view].data_ptr() != w.data_ptr():
                taken.append((w, w.data))
                w.data = copies[view]
    try:
        yield
    finally:
        for w, data in taken:
            w.data = data


# A forward-only stage on the CPU makes traces of its networks (models.traced) when its full lanes make
# at least this many network calls: a trace costs about 0.25 s and two forwards and saves 1.5-3 ms a call
# on the digits UNet (bench/RESULTS.md, "The network's forward from a trace"), so a short run makes none
# (it still replays the traces an earlier stage of the command made).
TRACE_MIN_CALLS = 128


@contextlib.contextmanager
def traced_networks(model: LoadedModel, lane: int, calls: int) -> Iterator[None]:
    """For a forward-only stage on the CPU expecting ``calls`` full-lane network calls: the base, tuned
    and corrector networks that ``models.traced.traceable`` allows run full lanes (``lane`` rows, or
    ``2 lane`` under guidance) from traces checked bitwise against eager (``TracedForward``), made
    only from ``TRACE_MIN_CALLS`` calls on; given back afterwards. Same outputs, so nothing is keyed."""
    corrector = model.corrector
    saved = (model.network, model.tuned, getattr(corrector, "network", None))
    if model.device.type == "cpu":
        make = calls >= TRACE_MIN_CALLS
        if traceable(model.network):
            model.network = TracedForward(model.network, (lane, 2 * lane), make)
        if traceable(model.tuned):
            model.tuned = TracedForward(model.tuned, (lane, 2 * lane), make)
        if traceable(saved[2]):
            corrector.network = TracedForward(corrector.network, (lane,), make)
    try:
        yield
    finally:
        model.network, model.tuned = saved[:2]
        if saved[2] is not None:
            corrector.network = saved[2]


def full_lane_calls(cfg: SampleConfig) -> int:
    """The network calls on full lanes a sample stage makes (``cfg.lane`` resolved): what ``traced_networks``
    weighs against ``TRACE_MIN_CALLS``."""
    return cfg.num // cfg.lane * cfg.steps


def compile_note(model: LoadedModel, cfg: SampleConfig) -> Optional[str]:
    """One line where ``sample.compile`` is asked for on the CPU and the stage would otherwise replay the
    network from a trace (a ``traceable`` network, at least ``TRACE_MIN_CALLS`` full-lane calls): there
    the compiled stage measured slower, compile included (bench/RESULTS.md, tenth session), so it is
    said, not refused. Where the default would run eager (a short run), compiling can pay: no note."""
    if not cfg.compile or model.device.type != "cpu" or not traceable(model.network):
        return None
    if full_lane_calls(resolve_lane(model, cfg)) < TRACE_MIN_CALLS:
        return None
    return ("sample.compile on the CPU: this run would otherwise replay the network from a trace, which measured "
            "about as fast as compiled on the bundled digits UNet (the compiled network 1.04x at a lane of 64) "
            "before the compile's cost (1024 images, 8 steps, two cores: 4.5 s by default, 8.1 s compiled with the "
            "compile cached); --set sample.compile=false runs the default")


@contextlib.contextmanager
def compiled_networks(model: LoadedModel, on: bool) -> Iterator[None]:
    """With ``sample.compile``, the model's networks ``torch.compile``d (inductor, static shapes) for
    the stage and given back afterwards (later stages in the process run eager); else nothing."""
    saved = (model.network, model.tuned)
    if on:
        model.network = torch.compile(model.network, dynamic=False)
        if model.tuned is not None:
            model.tuned = torch.compile(model.tuned, dynamic=False)
    try:
        yield
    finally:
        model.network, model.tuned = saved


# Lanes (or shards) side by side, one torch thread each, where as many lanes as torch has threads hold at
# most this many sample values (64 CIFAR-size images; the digits on two threads: 2 x 64 x 256): the
# inversion's solver calls on the few rows still iterating, and small convolutions and norms, split poorly
# across threads (bench/RESULTS.md, "The network's forward from a trace; the inversion's lanes side by
# side": -1.3 to -2.9 s of the main job's 21-23 s inversion on two threads; "Sampling shards side by
# side": the main job's 1000 base digits in 3.8-4.1 against 4.3-4.7 s). Larger lanes, or more threads, go
# one at a time on all threads, so no more activations are held than one lane's budget.
SIDE_BY_SIDE_VALUES = 64 * 3 * 32 * 32
T = TypeVar("T")


def lanes_side_by_side(model: LoadedModel, lane: int, threads: Optional[int] = None) -> Optional[int]:
    """How many lanes run side by side, one thread each (``side_by_side``): torch's thread count (or
    ``threads``), on the CPU, for a ``traceable`` base network, where that many lanes hold at most
    ``SIDE_BY_SIDE_VALUES`` sample values; else None (a lane at a time on all threads). In the stage's
    key where it applies (the inversion's ``lanes_side_by_side``, sampling's ``threads_per_shard``):
    work on one thread has the same bytes on any machine of that ISA, whatever its thread count, while
    on all threads a convolution can round differently (the digits UNet at 5-7 and 9-11 images a call).
    Each process reads its own thread count: under ``accelerate``, machines of one core count share a key."""
    threads = threads or torch.get_num_threads()
    small = threads * lane * math.prod(model.sample_shape) <= SIDE_BY_SIDE_VALUES
    return threads if threads > 1 and small and model.device.type == "cpu" and traceable(model.network) else None


def all_threads_key(model: LoadedModel, one_thread: bool) -> dict[str, int]:
    """``{"threads": n}`` for a CPU stage whose work runs on all of this process's n > 1 threads (not one thread
    each, side by side): their count can change a convolution's rounding, so it is keyed; else nothing."""
    threads = torch.get_num_threads() if model.device.type == "cpu" and not one_thread else 1
    return {"threads": threads} if threads > 1 else {}


def side_by_side(fn: Callable[[Any], T], items: Iterable[Any], threads: int,
                 stop: Optional[threading.Event] = None) -> Iterator[T]:
    """``fn(item)`` for each item, yielded in order as each is done, ``threads`` items at a time, each on
    one torch thread in the caller's grad and inference mode (both are per thread), however few items
    there are. Until the iteration ends (or is closed) the caller's own thread has one torch thread too;
    then torch's thread count is given back, and the memory the threads freed (``io.host.release_free_memory``:
    glibc keeps it in their malloc arenas otherwise). A failing item, or the caller leaving early (an
    error while it handles an item, Ctrl-C), cancels the items not started and sets ``stop``: an ``fn``
    that checks it (the sample stage does, every step) ends the items under way within a step, rather
    than the pool waiting for them to finish."""
    previous, inference, grad = torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def one(item: Any) -> T:
        torch.set_num_threads(1)  # a new thread's own OpenMP team is torch's width until it is told
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(item)

    torch.set_num_threads(1)
    finished = False
    try:  # Executor.map's results cancel the items not started when they are left early
        with ThreadPoolExecutor(threads, thread_name_prefix="pgraft-lane") as pool:
            try:
                yield from pool.map(one, items)
                finished = True
            finally:
                if not finished and stop is not None:
                    stop.set()  # before the pool's exit waits for the items under way
    finally:
        torch.set_num_threads(previous)
        release_free_memory()


def map_lanes(fn: Callable[[int], T], starts: Sequence[int], together: Optional[int],
              stop: Optional[threading.Event] = None) -> list[T]:
    """``[fn(start) for start in starts]``, in order: ``side_by_side`` (with its ``stop``) where ``together``
    (``lanes_side_by_side``) lanes or more are given; fewer run one at a time on all threads (a shard's
    lanes are fixed by its size, so a shard always runs the same way)."""
    if together is None or len(starts) < together:
        return [fn(start) for start in starts]
    return list(side_by_side(fn, starts, together, stop))


def shards_side_by_side(model: LoadedModel, cfg: SampleConfig, shards: int, threads: Optional[int] = None) -> Optional[int]:
    """How many of a sample stage's shards run side by side (``side_by_side``, one thread each):
    ``lanes_side_by_side`` for the rows of one network call (a lane, two under classifier-free guidance),
    where each process has at least two rounds of that many shards (``shards``: a process's share; a
    shard on one thread of two took about 1.6x its time on both, so three shards side by side are no
    faster than one after the other) and the stage is not compiled; else None (a shard at a time on all
    threads). Decided from the stage's settings, never from how many shards are left, so a resumed stage
    runs its shards as a fresh one does."""
    guided = model.guided and (cfg.guidance_scale or 1.0) > 1.0
    together = None if cfg.compile else lanes_side_by_side(model, cfg.lane * (2 if guided else 1), threads)
    return together if together is not None and shards >= 2 * together else None


def stage_config(model: LoadedModel, cfg: SampleConfig, cond: Conditions) -> dict[str, Any]:
    """Everything that determines the shards: the images (see the module doc) and their layout.

    The whole [sample] section (a key added later is keyed automatically); ``guidance_scale`` only
    where the model is guided (elsewhere the sampler never reads it). The model itself is keyed by
    :func:`checkpoints.model_key` among the stage's inputs.
    """
    config = {
        **asdict(cfg), "guidance_scale": cfg.guidance_scale if model.guided else None, "family": model.family, "prediction_type": model.schedule.prediction_type,
        "grid": "flow-euler" if model.family == "flow" else "ddim-trailing", "shift": model.schedule.shift,
        "conditions": cond.to_json(), "dtype": str(model.dtype), "device_type": model.device.type,
        "autocast": None if model.autocast is None else str(model.autocast),
        "corrector": None if model.corrector is None else {
            "type": model.corrector.kind, "steps": model.corrector.steps, "sampler": model.corrector.sampler, "base_steps": model.corrector.base_steps},
    }
    if model.adapter.classifier_free:  # only guidance-distilled networks read it
        config.pop("distilled_guidance")
    return config


def _shard_tensors(model: LoadedModel, cfg: SampleConfig, cond: Conditions, indices: list[int],
                   on_step: Any) -> dict[str, Tensor]:
    """Sample the images of one shard, one lane at a time (padding of the last lane is dropped)."""
    lane = cfg.lane
    first = indices[0] - indices[0] % lane
    grid = model.schedule.grid(cfg.steps)
    finals, captures, capture_t = [], [], None
    for start in range(first, indices[-1] + 1, lane):
        members = list(range(start, start + lane))
        noise = initial_noise(cfg.seed, members, model.sample_shape).to(model.device, model.dtype)
        conditions = cond.for_indices(model, members)
        if model.corrector is not None:  # inverse noise correction: e -> corrector (under each image's condition) -> base
            noise = model.corrector(noise, model.corrector.condition_of(*conditions, model.pooled_text))
        c = model.encode(*conditions, guidance_scale=cfg.guidance_scale, distilled_guidance=cfg.distilled_guidance)
        real = sum(1 for i in members if indices[0] <= i <= indices[-1])
        with model.autocast_context():
            x, captured = run_sampler(
                lambda x, t: model.predict(x, t, c), model.schedule, noise, grid,
                capture_at=cfg.capture_at, callback=lambda k: on_step(real / cfg.steps),
            )
        finals.append(x)
        if captured is not None:
            captures.append(captured[0].float().cpu())
            capture_t = captured[1]
    keep = torch.tensor([i - first for i in indices])
    images = torch.cat([to_uint8(model.decode(x).cpu()) for x in finals])[keep]
    final = torch.cat([x.float().cpu() for x in finals])[keep]
    prompts, classes = cond.for_indices(model, indices)
    out = {"index": torch.tensor(indices, dtype=torch.int64), "images": images.contiguous(),
           "samples": final.contiguous(),
           # the generator seed of each trajectory's initial noise (see noise_seed), for re-use
           "noise_seed": torch.tensor([noise_seed(cfg.seed, i) for i in indices], dtype=torch.int64)}
    if classes is not None:
        out["class_label"] = torch.tensor(classes, dtype=torch.int64)
    if prompts is not None:
        all_prompts = cond.prompts or [""]
        out["prompt_index"] = torch.tensor([i % len(all_prompts) for i in indices], dtype=torch.int64)
    if captures:
        out["captured"] = torch.cat(captures)[keep].contiguous()
        out["captured_t"] = torch.full((len(indices),), float(capture_t), dtype=torch.float64)
    return out


def run_sample(model: LoadedModel, cfg: SampleConfig, cond: Conditions, store: RunStore,
               bar: Any, process_index: int = 0, num_processes: int = 1,
               barrier: Any = None, stage_name: str = STAGE) -> SampleResult:
    """Run (or resume) the sample stage in ``store``; this process does shards ``k % P == rank``."""
    check_conditions(model, cond)
    auto, cfg = cfg.lane == "auto", resolve_lane(model, cfg, num_processes)
    cfg = replace(cfg, memory_format=resolve_memory_format(model, cfg.memory_format))  # keyed as used
    inputs = {"model": model_key(model)}
    num_shards = math.ceil(cfg.num / cfg.batch_size)

    share = math.ceil(num_shards / num_processes)

    def config_for(lane: int) -> dict[str, Any]:  # the key's config at a lane: shards side by side or not follows
        at = replace(cfg, lane=lane)
        one_thread = shards_side_by_side(model, at, share) is not None  # the bytes are one thread's, whatever the count
        return {**stage_config(model, at, cond), **({"threads_per_shard": 1} if one_thread else {}),
                **all_threads_key(model, one_thread)}

    if auto:  # a resume keeps the lane its shards were made with
        cfg = replace(cfg, lane=resumed_lane(store, stage_name, config_for, inputs, cfg.lane))
    config = config_for(cfg.lane)
    together = shards_side_by_side(model, cfg, share)  # (config_for's decision at the lane the stage runs)
    stop = threading.Event()  # set when the side-by-side shards are left early (an error, Ctrl-C)
    rows = lambda k: list(range(k * cfg.batch_size, min((k + 1) * cfg.batch_size, cfg.num)))  # noqa: E731
    task, generated = None, 0

    def todo(mine: list[int]) -> None:
        nonlocal task, generated
        generated = sum(len(rows(k)) for k in mine)  # (work may run on several threads: counted here)
        task = bar.add_task("sampling", total=generated, unit="img")

    def step(n: float) -> None:
        check_stop(stop, "sample stage")
        bar.advance(task, n)

    def work(k: int) -> dict[str, Tensor]:
        with torch.inference_mode():
            return _shard_tensors(model, cfg, cond, rows(k), step)

    def settings(stage: Any) -> list[Path]:
        return [store.write_json(f"{stage_name}/settings.json", {**config, "prompts": cond.prompts})]

    start = time.perf_counter()
    with (network_memory_format(model, cfg.memory_format), compiled_networks(model, cfg.compile),
          traced_networks(model, cfg.lane, 0 if cfg.compile else full_lane_calls(cfg)),
          reused_cross_attention(model, enabled=not cfg.compile)):
        stage = store.run_sharded(stage_name, config, inputs, num_shards, work,
                                  Dist(process_index, num_processes, barrier), todo=todo, outputs=settings, stamp=True,
                                  map_work=map if together is None else functools.partial(side_by_side, threads=together,
                                                                                          stop=stop))
    shards = [stage.shard_path(k) for k in range(num_shards)]
    if process_index == 0:  # the images every process generated now (this process's own: ``generated``)
        generated = sum(len(rows(k)) for k in stage.pending)
    return SampleResult(store.root, cfg.num, shards, generated, time.perf_counter() - start, config)


def iter_images(run_dir: Path, stage_name: str = STAGE) -> Iterator[tuple[Tensor, Tensor]]:
    """``(index, images)`` of a sample stage, one shard at a time; images are floats in [0, 1], (N, C, H, W)."""
    for shard in RunStore(run_dir, is_main=False).stage(stage_name).shards("index", "images"):
        yield shard["index"], shard["images"].permute(0, 3, 1, 2).float() / 255.0


def load_images(run_dir: Path, stage_name: str = STAGE) -> Tensor:
    """All images of a sample stage as floats in [0, 1], (N, C, H, W), in index order."""
    return torch.cat([images for _, images in iter_images(run_dir, stage_name)])


PNG_GLOB = "[0-9][0-9][0-9][0-9][0-9].png"


def _written_by_pgraft(out: Path) -> bool:
    """Whether ``OUT/sampler.json`` is one that :func:`export_pngs` wrote."""
    try:
        settings = json.loads((out / "sampler.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and "pgraft_version" in settings


def check_png_folder(out: Path) -> None:
    """Refuse an output folder that is a file, or that holds numbered PNGs or a sampler.json that
    pgraft did not write (exporting would overwrite them)."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} is a file, but a folder is expected; pass a folder path")
    if not out.is_dir() or _written_by_pgraft(out):
        return
    clash = next(out.glob(PNG_GLOB), None) or next(out.glob("sampler.json"), None)
    if clash is not None:
        raise OutputPathError(f"--out {out} holds {clash.name}, which pgraft did not write and would overwrite; "
                              f"pass a new or empty folder")


# What a PNG folder's images depend on beyond their count (sampler.json's keys): reusing the folder for a
# sampling that differs in one of them would replace its images
PNG_IDENTITY = ("model_identity", "seed", "steps", "conditions", "guidance_scale", "distilled_guidance", "grid",
                "shift", "dtype", "autocast", "corrector")


def check_png_reuse(out: Path, wanted: dict[str, Any]) -> None:
    """Refuse an ``--out`` that holds the images of another sampling (a sampler.json pgraft wrote whose
    ``PNG_IDENTITY`` values differ from ``wanted``'s): its images would be replaced and the extra ones deleted.
    The same sampling again (any ``--num`` or ``--batch-size``) reuses the folder."""
    if not _written_by_pgraft(out):
        return
    old = json.loads((out / "sampler.json").read_text())
    for key in PNG_IDENTITY:
        if key in wanted and key in old and old[key] != json.loads(json.dumps(wanted[key], default=str)):
            raise OutputPathError(f"--out {out} holds the images of another sampling ({key} {old[key]!r}, not "
                                  f"{wanted[key]!r}), which this run would replace; pass a new folder, or --force")


def export_pngs(run_dir: Path, out: Path, settings: dict[str, Any], quiet: bool = True) -> int:
    """Write ``OUT/00000.png ...`` (atomically, one by one) and ``OUT/sampler.json`` from the shards; while
    they are written sampler.json says ``"complete": false`` (a stopped export is not read as either run's)."""
    check_png_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "sampler.json").exists():  # a folder pgraft wrote before: drop images past this run's num
        for old in out.glob(PNG_GLOB):
            if int(old.stem) >= settings["num"]:
                old.unlink()
    atomic_write_text(out / "sampler.json", json.dumps({**settings, "complete": False}, indent=2, sort_keys=True))
    n = 0
    for shard in RunStore(run_dir, is_main=False).stage(STAGE).shards("index", "images"):
        for i, image in zip(shard["index"].tolist(), shard["images"].numpy()):
            if i >= settings["num"]:
                continue
            atomic_write_bytes(out / f"{i:05d}.png", png_bytes(image))
            n += 1
    atomic_write_text(out / "sampler.json", json.dumps({**settings, "complete": True}, indent=2, sort_keys=True))
    return n
