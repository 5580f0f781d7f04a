"""`pgraft sample` on the bundled model: PNG output, determinism, prefix property, accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ONE_BLOCK_UNET
from safetensors.torch import load_file
from typer.testing import CliRunner

from pgraft_cli.cli import app
from pgraft_cli.stages.sample import noise_seed

runner = CliRunner()


def sample(tmp: Path, name: str, *args: str) -> tuple[Path, dict]:
    run_dir, out = tmp / f"run-{name}", tmp / f"out-{name}"
    result = runner.invoke(app, ["sample", "digits", "--run-dir", str(run_dir), "--out", str(out), "--json", *args])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_writes_numbered_pngs_and_settings(tmp_path):
    out, summary = sample(tmp_path, "a", "--num", "20", "--steps", "4", "--batch-size", "16", "--seed", "1")
    images = pngs(out)
    assert list(images) == [f"{i:05d}.png" for i in range(20)]
    from PIL import Image

    im = Image.open(out / "00000.png")
    assert im.size == (16, 16) and im.mode == "L"
    settings = json.loads((out / "sampler.json").read_text())
    assert settings["steps"] == 4 and settings["seed"] == 1 and settings["num"] == 20
    assert settings["family"] == "flow" and settings["lane"] == 16
    assert summary["num"] == 20 and summary["generated_now"] == 20
    # Distinct seeds per image: no two images identical.
    assert len(set(images.values())) == 20


def test_same_seed_same_bytes_whatever_batch_size_and_num(tmp_path):
    a, _ = sample(tmp_path, "a", "--num", "48", "--steps", "4", "--batch-size", "16", "--seed", "7")
    b, _ = sample(tmp_path, "b", "--num", "48", "--steps", "4", "--batch-size", "48", "--seed", "7")
    c, _ = sample(tmp_path, "c", "--num", "20", "--steps", "4", "--batch-size", "32", "--seed", "7")
    pa, pb, pc = pngs(a), pngs(b), pngs(c)
    assert pa == pb
    assert pc == {k: pa[k] for k in pc}  # a short run is the prefix of a longer one
    d, _ = sample(tmp_path, "d", "--num", "20", "--steps", "4", "--batch-size", "16", "--seed", "8")
    assert pngs(d) != pc


def test_smaller_run_into_same_out_folder_leaves_no_stale_images(tmp_path):
    out = tmp_path / "out"
    for num, name in ((32, "a"), (16, "b")):
        result = runner.invoke(app, ["sample", "digits", "--num", str(num), "--steps", "2", "--batch-size", "16",
                                     "--run-dir", str(tmp_path / f"run-{name}"), "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(16)]


def test_noise_seed_depends_on_seed_and_index_only():
    seeds = {noise_seed(s, i) for s in range(4) for i in range(64)}
    assert len(seeds) == 4 * 64
    assert noise_seed(3, 5) == noise_seed(3, 5)


def test_rerun_resumes_and_generates_nothing(tmp_path):
    out, first = sample(tmp_path, "a", "--num", "32", "--steps", "2", "--batch-size", "16")
    before = pngs(out)
    out2, second = sample(tmp_path, "a", "--num", "32", "--steps", "2", "--batch-size", "16")
    assert first["generated_now"] == 32 and second["generated_now"] == 0
    assert pngs(out2) == before


def test_capture_at_stores_intermediate_states(tmp_path):
    run_dir = tmp_path / "run-cap"
    result = runner.invoke(app, ["sample", "digits", "--num", "16", "--steps", "8", "--batch-size", "16",
                                 "--capture-at", "0.5", "--run-dir", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    shard = load_file(str(run_dir / "sample" / "shard-00000.safetensors"))
    assert shard["captured"].shape == (16, 1, 16, 16)
    assert shard["captured_t"].tolist() == [0.5] * 16
    assert shard["samples"].shape == (16, 1, 16, 16) and shard["images"].shape == (16, 16, 16, 1)
    assert shard["index"].tolist() == list(range(16))
    # the state at t = 0.5 is still noisy: further from the final sample than the final is from itself
    assert float((shard["captured"] - shard["samples"]).abs().mean()) > 0.1


def test_class_and_prompt_on_unconditional_model_are_refused(tmp_path):
    result = runner.invoke(app, ["sample", "digits", "--num", "4", "--class", "3", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "not class-conditioned" in str(result.exception)


@pytest.mark.slow
def test_accelerate_two_processes_match_one(tmp_path):
    from conftest import accelerate_launch, cli_run

    args = ["sample", "digits", "--num", "40", "--steps", "3", "--batch-size", "16", "--seed", "5", "--quiet"]
    # accelerate's --cpu flag uses its single-process launcher; --multi_gpu goes through torchrun, and
    # pgraft's PartialState(cpu=True) then picks the gloo backend on a machine without CUDA.
    two = accelerate_launch([*args, "--run-dir", str(tmp_path / "r2"), "--out", str(tmp_path / "o2")], timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = cli_run(*args, "--run-dir", tmp_path / "r1", "--out", tmp_path / "o1")  # one thread, as each launched process
    assert one.returncode == 0, one.stderr[-2000:]
    p1, p2 = pngs(tmp_path / "o1"), pngs(tmp_path / "o2")
    assert len(p1) == 40 and p1 == p2
    # both processes wrote shards: 3 shards of 16, 16 and 8 images, shard k by process k % 2
    from safetensors import safe_open

    writers = []
    for k in range(3):
        with safe_open(str(tmp_path / "r2" / "sample" / f"shard-{k:05d}.safetensors"), "pt") as f:
            writers.append(f.metadata()["pgraft.process"])
    assert writers == ["0/2", "1/2", "0/2"]


@pytest.mark.parametrize("failure", ["crash", "error"])
def test_forked_launch_fails_when_one_process_fails(tmp_path, monkeypatch, failure):
    """conftest's ``forked_launch`` (the two-process runs test_correct and test_finetune_cli compare with one
    process): a rank that raises, or ends in an ``error:`` line, fails the launch with its message; the
    other rank, left waiting at the stage's barrier, is stopped; and the traceback files torch's
    ``start_processes`` makes for each rank in the temporary folder are removed, not left behind."""
    import os
    import tempfile

    import pgraft_cli.stages.sample as stage
    from conftest import cli_run, forked_launch
    from pgraft_cli.errors import PgraftError

    real = stage.run_sample

    def second_rank_fails(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise (RuntimeError if failure == "crash" else PgraftError)("rank 1 failed here")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "run_sample", second_rank_fails)  # the forked ranks inherit the patch
    args = ["sample", "digits", "--num", "4", "--steps", "1", "--batch-size", "2", "--quiet"]
    assert cli_run(*args, "--run-dir", tmp_path / "one").returncode == 0  # (and the forks reuse its imports)
    error_files = lambda: set(Path(tempfile.gettempdir()).glob("pytorch-errorfile-*.pickle"))  # noqa: E731
    before = error_files()
    proc = forked_launch([*args, "--run-dir", str(tmp_path / "two")], timeout=120)
    assert not error_files() - before
    assert proc.returncode == (1 if failure == "crash" else 2), proc
    assert "rank 1 failed here" in proc.stderr
    assert ("Traceback" in proc.stderr) == (failure == "crash")


def test_the_cli_tunes_glibc_malloc_where_it_can():
    import platform

    from pgraft_cli.io.host import tune_allocator

    applied = tune_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False


def test_stage_readers_read_only_the_keys_and_rows_asked_for(tmp_path):
    """Streaming readers: one shard at a time, only the named keys, only the wanted rows."""
    import torch

    from pgraft_cli.stages.sample import iter_images, load_images
    from pgraft_cli.io.runstore import RunStore

    run = tmp_path / "run"
    sample(tmp_path, "rows", "--num", "37", "--steps", "2", "--batch-size", "16", "--capture-at", "0.5",
           "--run-dir", str(run))
    stage = RunStore(run, is_main=False).stage("sample")
    shards = list(stage.shards("index", "images"))
    assert len(shards) == 3 and all(set(s) == {"index", "images"} for s in shards)
    every = stage.tensors("index", "samples", "captured", "class_label")
    assert set(every) == {"index", "samples", "captured"} and torch.equal(every["index"], torch.arange(37))
    rows = torch.tensor([0, 1, 2, 15, 16, 17, 30, 36])  # runs that cross shard boundaries
    picked = stage.rows(rows, "samples", "captured")
    assert torch.equal(picked["samples"], every["samples"][rows])
    assert torch.equal(picked["captured"], every["captured"][rows])
    batches = list(iter_images(run))
    assert [len(b) for _, b in batches] == [16, 16, 5]
    assert torch.equal(torch.cat([b for _, b in batches]), load_images(run))


def _network_batches(monkeypatch) -> list[int]:
    from pgraft_cli.models.loaded import LoadedModel

    batches, call = [], LoadedModel._call
    monkeypatch.setattr(LoadedModel, "_call", lambda self, x, *a: batches.append(x.shape[0]) or call(self, x, *a))
    return batches


def test_auto_lane_pads_nothing_for_a_small_run(tmp_path, monkeypatch):
    batches = _network_batches(monkeypatch)
    out, summary = sample(tmp_path, "one", "--num", "1", "--steps", "2")
    assert batches == [1, 1]  # one image, two steps: no padded lane of 16
    assert summary["lane"] == 1 and json.loads((out / "sampler.json").read_text())["lane"] == 1


def test_auto_lane_on_the_cpu_is_the_measured_cpu_lane(tmp_path, monkeypatch):
    """Off CUDA the automatic lane is CPU_LANE (64: faster per image than 16, bench/cpu_lanes.py),
    still a divisor of the shard, and the same bytes as that lane fixed."""
    from pgraft_cli.stages.sample import CPU_LANE

    batches = _network_batches(monkeypatch)
    auto, summary = sample(tmp_path, "auto", "--num", "70", "--steps", "1", "--batch-size", "64")
    assert CPU_LANE == 64 and summary["lane"] == 64 and batches == [64, 64]
    fixed, _ = sample(tmp_path, "fixed", "--num", "70", "--steps", "1", "--batch-size", "64", "--set", "sample.lane=64")
    assert pngs(auto) == pngs(fixed)


def test_a_fixed_lane_is_honoured_and_keeps_bytes_whatever_num(tmp_path, monkeypatch):
    batches = _network_batches(monkeypatch)
    one, summary = sample(tmp_path, "one", "--num", "1", "--steps", "2", "--set", "sample.lane=16")
    assert batches == [16, 16] and summary["lane"] == 16
    many, _ = sample(tmp_path, "many", "--num", "20", "--steps", "2", "--batch-size", "32", "--set", "sample.lane=16")
    assert pngs(one)["00000.png"] == pngs(many)["00000.png"]


@pytest.mark.parametrize("num, batch_size, cap, lane", [
    (1, 64, 16, 1), (5, 64, 16, 5), (64, 64, 16, 16), (1000, 64, 16, 16),
    (100, 20, 16, 10),  # several shards: a divisor of the shard, so no lane straddles two
    (100, 64, 3, 2),  # a GPU that fits 3 images per call
])
def test_choose_lane(num, batch_size, cap, lane):
    from pgraft_cli.stages.sample import choose_lane

    assert choose_lane(num, batch_size, cap) == lane


def test_lane_cap_counts_reserved_but_unallocated_memory_as_free():
    """``mem_get_info`` does not see PyTorch's cached blocks: 1 GiB free + 3 GiB reserved of which 1 GiB
    allocated is 3 GiB usable; half of it over 100 MiB per image is 15 images (the old rule gave 5)."""
    from pgraft_cli.stages.sample import AUTO_LANE, lane_cap

    gib, mib = 1 << 30, 1 << 20
    assert lane_cap(gib, 3 * gib, gib, 100 * mib) == 15
    assert lane_cap(gib, gib, gib, 100 * mib) == 5 and lane_cap(0, 0, 0, gib) == 1
    assert lane_cap(100 * gib, 0, 0, mib) == AUTO_LANE


def test_a_resume_on_a_busier_gpu_keeps_the_recorded_lane_and_its_shards(tmp_path, monkeypatch):
    """The automatic lane depends on free memory; a resume that would pick a smaller one keeps the lane
    its shards were made with (recorded in the manifest and settings) instead of deleting them, and
    the default run directory does not move with it."""
    import pgraft_cli.stages.sample as sample_mod

    monkeypatch.setattr(sample_mod, "memory_lane_cap", lambda model, g: 4)
    run = tmp_path / "run-a"
    _, first = sample(tmp_path, "a", "--num", "8", "--steps", "2", "--batch-size", "8")
    shard = run / "sample" / "shard-00000.safetensors"
    before = shard.stat().st_mtime_ns
    monkeypatch.setattr(sample_mod, "memory_lane_cap", lambda model, g: 2)  # a busier GPU
    batches = _network_batches(monkeypatch)
    _, again = sample(tmp_path, "a", "--num", "8", "--steps", "2", "--batch-size", "8")
    assert first["lane"] == again["lane"] == 4 and again["generated_now"] == 0 and batches == []
    assert shard.stat().st_mtime_ns == before
    assert json.loads((run / "sample" / "settings.json").read_text())["lane"] == 4
    # a fresh run (another seed) picks the lane from memory as before
    _, other = sample(tmp_path, "c", "--num", "8", "--steps", "2", "--batch-size", "8", "--seed", "1")
    assert other["lane"] == 2


def test_compile_on_the_cpu_is_said_to_be_slower_where_the_default_replays_a_trace(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch, "compile", lambda network, **kwargs: network)  # the note, not minutes of compiling

    def run(name: str, *args: str):
        result = runner.invoke(app, ["sample", "digits", "--device", "cpu", "--run-dir", str(tmp_path / name),
                                     "--out", str(tmp_path / f"png-{name}"), "--num", "2", "--batch-size", "2",
                                     "--set", "sample.lane=1", *args])
        assert result.exit_code == 0, result.output
        return result.output

    traced = ["--steps", "64"]  # 2 lanes x 64 steps: TRACE_MIN_CALLS full-lane calls, so the default traces
    assert "sample.compile" not in run("plain", *traced)
    assert "--set sample.compile=false" in run("compiled", *traced, "--set", "sample.compile=true")  # and the way back
    assert len(list((tmp_path / "png-compiled").glob("*.png"))) == 2  # the run goes on as asked
    assert "sample.compile" not in run("quiet", *traced, "--set", "sample.compile=true", "--quiet")
    # a short run samples eager by default, where compiling can pay: nothing to say
    assert "sample.compile" not in run("short", "--steps", "63", "--set", "sample.compile=true")


def test_compile_note_is_for_a_cpu_network_the_stage_would_trace(tiny_sd_dir):
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.stages.sample import TRACE_MIN_CALLS, compile_note

    digits = load_model("digits")
    traced = SampleConfig(num=64, steps=TRACE_MIN_CALLS, lane="auto", compile=True)  # one lane of 64 on the CPU
    assert compile_note(digits, traced) is not None
    assert compile_note(digits, SampleConfig(num=64, steps=TRACE_MIN_CALLS - 1, compile=True)) is None
    assert compile_note(digits, SampleConfig(num=64, steps=TRACE_MIN_CALLS, compile=False)) is None
    # a UNet2DConditionModel is never traced: compiling is its only faster path, so nothing to say
    assert compile_note(load_model(str(tiny_sd_dir)), traced) is None


@pytest.mark.slow
def test_compile_is_an_opt_in_keyed_apart_with_the_eager_images_to_rounding(unet_pipeline_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    import torch
    import torch._inductor.config
    from torch._dynamo.utils import counters

    # the vector ISAs torch detects on this CPU are taken as buildable: without this, a fresh machine's first
    # compile builds and loads a probe program with g++ for each (about 5 s of this test's 18 s cold). The
    # checks' results stay cached in the worker (valid_vec_isa_list), where no other test compiles with inductor.
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", True)

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.sample import Conditions, run_sample

    class NoBar:
        def add_task(self, *a, **k):
            return 0

        def advance(self, *a, **k):
            pass

    # conftest's ONE_BLOCK_UNET: the keying, the handing back and the closeness to eager are what it checks,
    # on a graph whose cold compile is short
    model = load_model(str(unet_pipeline_dir(scheduler="flow", sample_size=16, **ONE_BLOCK_UNET)))
    eager = model.network
    runs = {}
    counters.clear()
    for on in (False, True):
        with RunStore(tmp_path / f"run-{on}") as store:
            result = run_sample(model, replace(SampleConfig(num=4, steps=2, batch_size=4, lane=4), compile=on),
                                Conditions(), store, NoBar())
            runs[on] = load_file(str(result.shards[0])), store.read_manifest()["stages"]["sample"]["key"]
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    assert model.network is eager  # given back: later stages in the process run eager
    (off, key_off), (on, key_on) = runs[False], runs[True]
    assert key_on != key_off  # other last bits: never served from the eager run's cache
    torch.testing.assert_close(on["samples"], off["samples"], rtol=0, atol=1e-4)
    assert (on["images"].int() - off["images"].int()).abs().max() <= 1


class _NoBar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


def _four_d_layouts(model) -> set[str]:
    """The layouts of the network's convolution weights (those where the two formats differ in memory)."""
    import torch

    return {"channels_last" if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() else
            "contiguous" for p in model.network.parameters() if p.dim() == 4 and p.shape[1] > 1 and p[0, 0].numel() > 1}


def test_memory_format_auto_is_channels_last_for_the_measured_families_on_the_cpu_only():
    from types import SimpleNamespace

    import torch

    from pgraft_cli.stages.sample import CHANNELS_LAST_FAMILIES, resolve_memory_format

    def model(cls, device):
        return SimpleNamespace(model_class=cls, device=torch.device(device))

    assert "UNet2DModel" in CHANNELS_LAST_FAMILIES
    assert resolve_memory_format(model("UNet2DModel", "cpu"), "auto") == "channels_last"
    assert resolve_memory_format(model("UNet2DModel", "cuda"), "auto") == "contiguous"  # not measured there
    assert resolve_memory_format(model("SD3Transformer2DModel", "cpu"), "auto") == "contiguous"  # no convolutions
    for fixed in ("contiguous", "channels_last"):
        assert resolve_memory_format(model("SD3Transformer2DModel", "cuda"), fixed) == fixed


def test_channels_last_is_the_cpu_default_keyed_apart_same_seed_same_bytes(tmp_path, monkeypatch):
    """The default on the CPU runs the digits UNet with channels_last weights (and gives them back
    contiguous: training sees the layout it always had); its shards are keyed apart from contiguous
    ones, a rerun in a fresh run directory gives the same bytes, and contiguous differs by rounding only."""
    from dataclasses import replace

    import torch

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.models.loaded import LoadedModel
    from pgraft_cli.stages.sample import Conditions, run_sample

    model = load_model("digits")
    seen, call = [], LoadedModel._call
    monkeypatch.setattr(LoadedModel, "_call", lambda self, *a: seen.append(_four_d_layouts(self)) or call(self, *a))
    runs = {}
    for name, fmt in (("auto", "auto"), ("again", "auto"), ("contiguous", "contiguous")):
        seen.clear()
        with RunStore(tmp_path / name) as store:
            result = run_sample(model, replace(SampleConfig(num=5, steps=2, batch_size=5, lane=5), memory_format=fmt),
                                Conditions(), store, _NoBar())
            runs[name] = (load_file(str(result.shards[0])), store.read_manifest()["stages"]["sample"]["key"],
                          result.settings["memory_format"])
        assert seen and all(s == {"channels_last" if fmt == "auto" else "contiguous"} for s in seen)
        assert _four_d_layouts(model) == {"contiguous"}  # given back after the stage
    (auto, key, used), (again, key_again, _), (contiguous, key_contiguous, used_contiguous) = runs.values()
    assert used == "channels_last" and used_contiguous == "contiguous"
    assert key == key_again and key != key_contiguous  # cached shards never mix formats
    assert all(torch.equal(auto[k], again[k]) for k in auto)  # same seed, same bytes
    torch.testing.assert_close(auto["samples"], contiguous["samples"], rtol=0, atol=1e-4)
    assert (auto["images"].int() - contiguous["images"].int()).abs().max() <= 1


def test_channels_last_stage_gives_back_each_weight_as_it_was_shared_storage_included():
    """network_memory_format converts the contiguous 4-D weights for the stage and afterwards puts
    back the very tensors it took: storage shared between modules (and between the base and the tuned
    network) is shared again, a weight that was channels_last before stays so, the bytes are equal."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from pgraft_cli.stages.sample import network_memory_format

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 4))
    base[1].weight = nn.Parameter(base[0].weight.data)  # two modules, one storage
    base[2].weight.data = base[2].weight.data.contiguous(memory_format=torch.channels_last)
    tuned = nn.Sequential(nn.Conv2d(3, 4, 3))
    tuned[0].weight = nn.Parameter(base[0].weight.data)  # the tuned network shares the base's weight
    model = SimpleNamespace(network=base, tuned=tuned)
    before = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in
              [*base.named_parameters(), *(("tuned." + n, p) for n, p in tuned.named_parameters())]}

    with network_memory_format(model, "channels_last"):
        for net in (base, tuned):
            for p in net.parameters():
                if p.dim() == 4:
                    assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        assert base[0].weight.data_ptr() == base[1].weight.data_ptr() == tuned[0].weight.data_ptr()  # one copy

    after = {name: p for name, p in [*base.named_parameters(), *(("tuned." + n, p) for n, p in tuned.named_parameters())]}
    for name, (ptr, stride, value) in before.items():
        assert (after[name].data_ptr(), after[name].stride()) == (ptr, stride), name
        assert torch.equal(after[name], value), name
    assert base[0].weight.data_ptr() == base[1].weight.data_ptr() == tuned[0].weight.data_ptr()
    assert base[2].weight.is_contiguous(memory_format=torch.channels_last) and not base[2].weight.is_contiguous()


def test_a_cpu_stage_on_all_threads_keys_their_number(tmp_path):
    """A shard that runs on all of a process's threads can round its convolutions by their count (lanes of 6
    and 10 differed by 6e-7, a PNG by one level, between an `accelerate` process's one thread and a plain
    run's two), yet the stage's key left the count out: a resume mixed the two kinds of shards. One shard of
    8 (not side by side) sampled at 2 threads and then at 1 is sampled again, not reused."""
    from conftest import cli_run

    args = ["sample", "digits", "--num", "8", "--steps", "1", "--run-dir", tmp_path / "run", "--json", "--quiet"]
    first = json.loads(cli_run(*args, threads=2).stdout)
    again = json.loads(cli_run(*args, threads=2).stdout)
    other = json.loads(cli_run(*args, threads=1).stdout)
    assert (first["generated_now"], again["generated_now"], other["generated_now"]) == (8, 0, 8)


def test_two_processes_count_every_image_they_generate(tmp_path):
    """The summary of a two-process `pgraft sample` counted the main process's images alone ("wrote 20 images
    (8 already done)" for a fresh run, and its images per second); it counts every process's now, and on a
    resume those shards alone that were missing."""
    from conftest import cli_run, forked_launch

    args = ["sample", "digits", "--num", "20", "--steps", "1", "--batch-size", "4", "--json", "--quiet",
            "--run-dir", str(tmp_path / "run")]
    assert cli_run("sample", "digits", "--num", "4", "--steps", "1", "--run-dir", tmp_path / "warm").returncode == 0
    fresh = forked_launch(args)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1])["generated_now"] == 20
    (tmp_path / "run" / "sample" / "shard-00001.safetensors").unlink()  # written by process 1
    resumed = forked_launch(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["generated_now"] == 4


@pytest.mark.parametrize("verb", ["score", "filter"])
def test_score_and_filter_under_several_processes_say_they_run_in_one(tmp_path, monkeypatch, verb):
    """Under `accelerate launch` every process of `pgraft score` / `pgraft filter` opened the run as the main one,
    and all but one failed with "run directory ... is in use"; one line says to run them in one process now."""
    from conftest import cli_run

    assert cli_run("sample", "digits", "--num", "4", "--steps", "1", "--run-dir", tmp_path / "run").returncode == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--reward", "jpeg-incompressibility"] if verb == "score" else []
    proc = cli_run(verb, tmp_path / "run", *args)
    assert proc.returncode == 2 and "runs in one process" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_another_samplings_png_folder_is_not_replaced_without_force(tmp_path):
    """`pgraft sample --out DIR` into a folder an earlier sampling filled replaced its images (and deleted those past
    the new --num) without a word: 16 images of seed 0 became 4 of seed 5. Another sampling is refused before any
    work now; the same sampling at another --num reuses the folder, --force replaces it."""
    from conftest import cli_run

    out = tmp_path / "png"

    def run(*args):
        return cli_run("sample", "digits", "--steps", "1", "--run-dir", tmp_path / "run", "--out", out, "--quiet", *args)

    assert run("--num", "16", "--seed", "0").returncode == 0
    before = pngs(out)
    refused = run("--num", "4", "--seed", "5")
    assert refused.returncode == 2 and "another sampling (seed 0, not 5)" in refused.stderr
    assert pngs(out) == before
    assert run("--num", "8", "--seed", "0").returncode == 0 and pngs(out) == dict(list(before.items())[:8])
    assert run("--num", "4", "--seed", "5", "--force").returncode == 0 and len(pngs(out)) == 4
