"""The host process: the cyclic garbage collector held while a model's libraries import, spared at exit."""

import gc
import subprocess
import sys

import pytest

from pgraft_cli.errors import PgraftError
from pgraft_cli.io.host import gc_paused


def test_gc_paused_holds_the_collector_and_restores_its_state_even_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # a caller that switched it off keeps it off
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_in_a_one_command_process_the_end_of_a_paused_block_freezes_what_is_alive(monkeypatch):
    import pgraft_cli.io.host as host

    gc.collect()  # the block collects the young generations only: earlier tests' old garbage is not frozen with it
    before = gc.get_freeze_count()
    with gc_paused():
        kept = [[i] for i in range(1000)]
    assert gc.get_freeze_count() == before  # a process that goes on: nothing frozen
    monkeypatch.setattr(host, "_ONE_COMMAND", True)
    with gc_paused():
        kept += [[i] for i in range(1000)]
    # (they stay frozen, a few thousand small objects: gc.unfreeze() would also hand back what conftest froze)
    assert gc.get_freeze_count() >= before + 2000 and gc.isenabled()


def test_a_cycle_an_import_leaves_does_not_keep_its_callers_alive(monkeypatch):
    """An import may leave a frame in a reference cycle (torch._dynamo's module-level ``torch.fx.wrap`` call
    does), whose ``f_back`` holds its callers' frames and their locals: in a one-command process the block
    collects that garbage before freezing, or what the callers held would outlive them to the exit."""
    import weakref

    import pgraft_cli.io.host as host

    class Weights:
        pass

    def leave_a_cycle():
        here = sys._getframe()  # noqa: F841 - the frame refers to itself through this local

    def caller():
        weights = Weights()
        with gc_paused():
            leave_a_cycle()
        return weakref.ref(weights)

    monkeypatch.setattr(host, "_ONE_COMMAND", True)
    gc.collect()  # (earlier tests' old garbage is not frozen with what the block freezes)
    ref = caller()
    gc.collect()
    assert ref() is None


def test_a_model_load_holds_the_collector_for_the_imports_alone(monkeypatch):
    """diffusers' network code is imported with the collector held, then the weights are read with it on."""
    import pgraft_cli.io.checkpoints as checkpoints
    import pgraft_cli.models.families as families
    from pgraft_cli.io.recipes import load_recipe
    from pgraft_cli.pipelines.skeleton import load

    calls = []

    def fake_imports():
        calls.append(("imports", gc.isenabled()))

    def fake_load_model(model, **kwargs):
        calls.append(("weights", gc.isenabled()))
        if model == "broken":
            raise PgraftError("broken model")
        return "loaded"

    monkeypatch.setattr(families, "import_network_code", fake_imports)
    monkeypatch.setattr(checkpoints, "load_model", fake_load_model)
    recipe = load_recipe("default")
    assert load("digits", None, None, False, recipe) == "loaded"
    with pytest.raises(PgraftError, match="broken model"):
        load("broken", None, None, False, recipe)
    assert calls == [("imports", False), ("weights", True)] * 2 and gc.isenabled()


LEAK_PROBE = """
import gc, sys, weakref
import safetensors.torch
import pgraft_cli.io.host as host
host.one_command_process()
read, real = [], safetensors.torch.load_file
def spy(*args, **kwargs):
    state = real(*args, **kwargs)
    read.extend(weakref.ref(t) for t in state.values())
    return state
safetensors.torch.load_file = spy
from pgraft_cli.io.recipes import load_recipe
from pgraft_cli.pipelines.skeleton import load
model = load(sys.argv[1], None, None, False, load_recipe("default"))
gc.collect()  # what is not frozen goes; what is frozen stays
print(len(read), sum(r() is not None for r in read), sum(p.numel() for p in model.network.parameters()))
"""


def test_a_one_command_load_frees_the_weights_it_read(tmp_path):
    """The state dict read from the file is copied into the network and then freed, in a one-command
    process too: nothing frozen may keep the frames that held it (a garbage cycle made while the
    libraries import, such as torch.fx's ``wrap`` keeping its frame, must not outlive the load)."""
    done = subprocess.run([sys.executable, "-c", LEAK_PROBE, "digits"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    read, alive, parameters = map(int, done.stdout.split())
    assert read > 100 and parameters > 1_000_000  # the bundled model's tensors were read from its file
    assert alive == 0


def test_the_console_entry_freezes_but_an_in_process_run_does_not(tmp_path, monkeypatch):
    """``pgraft`` (``cli.console``) freezes what it built (the interpreter's last collection skips it) at
    the end of the model's load and at its exit; ``cli.main`` in a process that goes on (the tests'),
    never: frozen objects are never collected."""
    from pathlib import Path

    from pgraft_cli.io.recipes import tomllib

    from pgraft_cli.cli import main

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append("gc.freeze()"))
    monkeypatch.setattr("sys.argv", ["pgraft", "recipes", "ls"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0 and frozen == []
    monkeypatch.undo()
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pgraft": "pgraft_cli.cli:console"}
    runs = (("from pgraft_cli.cli import console\nconsole()\n", ["recipes", "ls"], 0),
            ("import runpy\nrunpy.run_module('pgraft_cli', run_name='__main__')\n", ["recipes", "show", "no-such"], 2))
    for call, argv, code in runs:  # the executable's entry, and python -m pgraft_cli; a success, and an error
        probe = ("import atexit, gc, sys\n"
                 "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
                 "sys.argv = ['pgraft'] + sys.argv[1:]\n" + call)
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == code, (call, done.stderr)
        frozen = int(done.stdout.strip().splitlines()[-1].split()[-1])
        assert frozen > 1000, call  # every module's objects, not just a few


def test_importing_the_network_code_early_is_only_a_speed_up(monkeypatch):
    """Every supported class is asked of diffusers by its public name; one a release lacks (or whose
    import fails) is skipped, left for the load itself to report."""
    import types

    import pgraft_cli.models.families as families

    asked = []

    class Diffusers(types.ModuleType):
        def __getattr__(self, name):
            asked.append(name)
            if name == "NoSuchNetwork2DModel":
                raise AttributeError(name)
            if name == "Broken2DModel":
                raise ImportError("a dependency failed")
            return object

    monkeypatch.setitem(sys.modules, "diffusers", Diffusers("diffusers"))
    monkeypatch.setattr(families, "SUPPORTED_CLASSES", ("NoSuchNetwork2DModel", "Broken2DModel", "UNet2DModel"))
    families.import_network_code()
    assert asked == ["NoSuchNetwork2DModel", "Broken2DModel", "UNet2DModel"]


THREAD_ARENAS = r"""
import os, threading
import torch
from pgraft_cli.io.host import release_free_memory, tune_allocator
assert tune_allocator()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

both = threading.Barrier(2)

def work():
    x = torch.ones(4 << 20)  # 16 MB, below the mmap threshold: from the thread's own arena
    both.wait()  # both blocks held at once, so each thread has an arena of its own
    del x

threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
held = rss()
assert release_free_memory()
print(held - rss())
"""


@pytest.mark.skipif(not (sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"), reason="glibc only")
def test_release_free_memory_gives_back_what_finished_threads_freed():
    """The inversion's lanes run on threads of their own, whose malloc arenas keep what they freed (+217 MB
    of peak RSS on the main job); release_free_memory hands it back."""
    released = int(subprocess.run([sys.executable, "-c", THREAD_ARENAS], capture_output=True, text=True,
                                  check=True).stdout)
    assert released > 12 << 20  # a thread's 16 MB block at least (the two share an arena at times)


def test_the_tests_run_with_the_collector_on_and_the_imports_frozen():
    """conftest holds the collector while the test modules import, then freezes what they built and
    switches it back on: a test sees the collector on (a hook that failed to would leave every worker
    without one) and the libraries' objects out of its collections."""
    assert gc.isenabled()
    assert gc.get_freeze_count() > 100_000  # torch and diffusers alone build several hundred thousand


def test_cpu_name_is_the_first_model_name_of_cpuinfo_else_the_platform(monkeypatch, tmp_path):
    import platform

    from pgraft_cli.io import host

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t:  Some   CPU @ 2.4GHz\n"
                    "\nprocessor\t: 1\nmodel name\t: Other\n")
    monkeypatch.setattr(host, "CPUINFO", info)
    assert host.cpu_name() == "Some CPU @ 2.4GHz (cpu family 25, model 1)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert host.cpu_name() == "Some CPU"
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "absent")
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert host.cpu_name() == "riscv64"


def test_a_run_records_the_cpu_its_seconds_were_measured_on(monkeypatch, tmp_path):
    """describe_cpu names the model, the CPUs, torch's threads and the vector ISA torch's kernels use, and
    whether bf16 is native; a run's provenance stores it as the device's name."""
    import os

    import torch

    from pgraft_cli.io import host
    from pgraft_cli.io.runstore import RunStore

    monkeypatch.setattr(host, "cpu_name", lambda: "Test CPU 9000")
    isa = torch.backends.cpu.get_cpu_capability()
    head = f"Test CPU 9000, {len(os.sched_getaffinity(0))} CPUs, torch {torch.get_num_threads()} threads, {isa}"
    monkeypatch.setattr(host, "native_cpu_bf16", lambda: False)
    assert host.describe_cpu() == head
    monkeypatch.setattr(host, "native_cpu_bf16", lambda: True)
    assert host.describe_cpu() == head + ", native bf16" == host.describe_device("cpu")
    assert host.describe_device("meta") is None and host.describe_device("auto") is None
    with RunStore(tmp_path / "run") as store:
        assert store.record_provenance("sample", device="cpu", seconds=1.0)["sample"]["device_name"] == head + ", native bf16"
        assert "device_name" not in store.record_provenance("score", seconds=1.0)["score"]


def _float32_settings():
    import torch

    from pgraft_cli.io.host import FLOAT32_BACKENDS, _backend

    return [_backend(torch.backends, path).fp32_precision for path in FLOAT32_BACKENDS]


def test_ieee_float32_turns_tf32_and_bf16_off_in_every_backend_and_puts_back_what_it_found():
    import torch

    from pgraft_cli.io.host import FLOAT32_BACKENDS, _backend, ieee_float32

    default = _float32_settings()
    assert default[1] == "tf32"  # torch's own default: cuDNN convolutions in TF32
    try:
        torch.set_float32_matmul_precision("medium")  # a training script's setting: TF32 matmuls, bf16 in oneDNN's
        before = _float32_settings()
        assert before[0] == "tf32" and before[3] == "bf16"
        with ieee_float32():
            assert _float32_settings() == ["ieee"] * 6
            with ieee_float32():  # nested: the outer block's settings come back, still ieee
                pass
            assert _float32_settings() == ["ieee"] * 6
        assert _float32_settings() == before and torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError, match="boom"), ieee_float32():
            raise RuntimeError("boom")
        assert _float32_settings() == before
    finally:
        torch.set_float32_matmul_precision("highest")
        for path, value in zip(FLOAT32_BACKENDS, default):
            _backend(torch.backends, path).fp32_precision = value
    assert _float32_settings() == default


def test_ieee_float32_on_a_torch_without_per_backend_settings_uses_the_older_ones_and_keeps_medium(monkeypatch):
    """As on torch < 2.9 (no ``fp32_precision``): cuDNN's ``allow_tf32`` and the matmul precision, put back as
    found; restoring cuBLAS's own flag after the precision would turn "medium" into "high" there."""
    import torch

    from pgraft_cli.io import host

    monkeypatch.setattr(host, "FLOAT32_BACKENDS", ("no.such_backend",))
    torch.set_float32_matmul_precision("medium")
    try:
        with host.ieee_float32():
            assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_ieee_float32_keeps_torchs_deprecation_warning_to_itself_and_the_callers_warnings_to_the_caller(monkeypatch):
    """torch 2.9 warns, once a process, when its older TF32 settings are read or set; under ``-W error`` that
    warning would end the block's caller, so the first block ignores warnings around those calls. Later blocks
    leave the warnings machinery alone: ``catch_warnings`` on every call would make Python forget which
    warnings it has shown and repeat the caller's once-only ones. A warning inside the block reaches the caller."""
    import warnings

    import torch

    from pgraft_cli.io import host

    def once(fn):
        fired = []

        def wrapped(*args):
            if not fired:
                fired.append(1)
                warnings.warn("Please use the new API settings to control TF32 behavior", UserWarning)
            return fn(*args)
        return wrapped

    for name in ("_get_cudnn_allow_tf32", "_set_cudnn_allow_tf32"):
        monkeypatch.setattr(torch._C, name, once(getattr(torch._C, name)))
    monkeypatch.setattr(torch, "set_float32_matmul_precision", once(torch.set_float32_matmul_precision))
    monkeypatch.setattr(host, "_QUIETED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            with host.ieee_float32():
                assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32" and host._QUIETED
    with pytest.warns(FutureWarning, match="the caller's"), host.ieee_float32():
        warnings.warn("the caller's", FutureWarning)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # once per place
        for _ in range(5):
            with host.ieee_float32():
                warnings.warn("once-only", DeprecationWarning)
    assert len(shown) == 1


ROUND_TRIP = r"""
import torch
from pgraft_cli.io.host import ieee_float32

NODES = ["", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul", "mkldnn.conv",
         "mkldnn.rnn"]

def node(path):
    out = torch.backends
    for part in filter(None, path.split(".")):
        out = getattr(out, part)
    return out

def answer(get):
    try:
        return get()
    except RuntimeError as exc:
        return "refused: " + str(exc)[:60]

def state():
    out = {p: node(p).fp32_precision for p in NODES}
    for name, get in (("precision", torch.get_float32_matmul_precision), ("cudnn", lambda: torch.backends.cudnn.allow_tf32),
                      ("cublas", lambda: torch.backends.cuda.matmul.allow_tf32)):
        out[name] = answer(get)
    return out

SETUPS = ["pass", "torch.set_float32_matmul_precision('high')", "torch.set_float32_matmul_precision('medium')",
          "torch.backends.cuda.matmul.allow_tf32 = True", "torch.backends.cudnn.allow_tf32 = False",
          "torch.backends.fp32_precision = 'tf32'", "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
          "torch.backends.cudnn.fp32_precision = 'ieee'", "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
          "torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.fp32_precision = 'ieee'"]
for setup in SETUPS:  # each on top of the ones before: mixed states too
    exec(setup)
    before = state()
    inside = None
    with ieee_float32():
        inside = state()
        with torch.backends.cudnn.flags(enabled=False) if before["cudnn"] in (True, False) else torch.no_grad():
            pass
    assert state() == before, (setup, before, state())
    assert all(inside[p] == "ieee" for p in NODES if p.count(".")), (setup, inside)
    if before["cudnn"] in (True, False):  # torch answered on entry: so it does inside, and says no TF32
        assert inside["cudnn"] is False, (setup, inside)
    if before["precision"] in ("highest", "high", "medium"):
        assert inside["precision"] == "highest" and inside["cublas"] is False, (setup, inside)
print("ok", len(SETUPS))
"""


def test_ieee_float32_puts_back_every_setting_it_found_and_torch_still_answers_inside():
    """From torch's defaults, from each setting a script may make, and from mixes of the older and newer ones:
    every setting reads the same after the block as before it; inside, the older settings agree with "ieee" (a
    TorchScript network saved before torch 1.7 reads cuDNN's flag; ``torch.backends.cudnn.flags`` reads it too),
    except where they disagreed on entry, which the block leaves as it was."""
    out = subprocess.run([sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok 10", out.stderr[-2000:]


def test_features_and_rewards_are_computed_without_tf32_and_their_cpu_numbers_do_not_move():
    """What a run reports (FID/KID features, the copy test, rewards and judges) is computed in full float32 on
    every device; on the CPU the block changes no byte."""
    import torch

    from pgraft_cli.stages.evaluate import Features, classifier_features
    from pgraft_cli.stages.rewards import Reward, parse_reward

    seen = []

    def spy(x):
        seen.append(_float32_settings())
        return x.flatten(1)[:, :3]

    Features("spy", spy)(torch.rand(5, 1, 16, 16))
    Reward("spy", lambda x, p: seen.append(_float32_settings()) or x.mean((1, 2, 3)))(torch.rand(5, 1, 16, 16))
    assert seen[-2:] == [["ieee"] * 6] * 2
    assert _float32_settings()[1] == "tf32"  # put back after each
    x = torch.rand(70, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    feats = classifier_features()
    with torch.no_grad():
        assert torch.equal(feats(x), feats.fn(x).double())
        reward = parse_reward("classifier:digits:3")
        assert torch.equal(reward(x), reward.fn(x, None).double().cpu())


def test_the_copy_tests_float32_search_runs_without_tf32_too(monkeypatch):
    """The copy test's nearest-neighbour search (and its k-means) multiply the features' float32 rows: computed
    inside the block as well. (KID, precision/recall and the diversity distances are float64 on the CPU.)"""
    import torch

    from pgraft_cli.core.metrics import FidKid
    from pgraft_cli.stages import evaluate

    seen = []
    real_nearest = evaluate.nearest_distances
    monkeypatch.setattr(evaluate, "nearest_distances", lambda *a, **k: seen.append(_float32_settings()) or real_nearest(*a, **k))
    g = torch.Generator().manual_seed(0)
    held, train = FidKid(4, kid_subsets=2), FidKid(4, kid_subsets=2)
    held.update(torch.randn(40, 4, generator=g), real=True)
    train.update(torch.randn(200, 4, generator=g), real=True)
    ref, why = evaluate.copy_reference(held, train, "train", 100)
    assert why is None
    evaluate.copying(torch.randn(50, 4, generator=g), ref)
    assert len(seen) == 2 and all(s == ["ieee"] * 6 for s in seen)
    assert _float32_settings()[1] == "tf32"
