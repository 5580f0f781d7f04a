"""models.traced: a network's forward replayed from checked TorchScript traces (bitwise eager), and the
stages' use of it (stages.sample.traced_networks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pgraft_cli.models.traced import TracedForward, traceable
from tests.conftest import build_tiny_unet


@pytest.fixture(autouse=True)
def _trace_whatever_a_call_takes(monkeypatch):
    """A loaded box must not turn tracing off (the gate on a call's seconds has a test of its own)."""
    from pgraft_cli.models import traced as module

    monkeypatch.setattr(module, "TRACE_MAX_CALL_SECONDS", float("inf"))


def _python_calls(network: nn.Module) -> list[int]:
    """Counts the Python forwards of the network's first convolution (a replayed trace runs none)."""
    calls: list[int] = []
    network.conv_in.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("classes", [None, 3])
def test_a_traced_forward_is_bitwise_eager_for_every_input_of_its_signature(classes):
    network = build_tiny_unet(num_class_embeds=classes)
    eager = build_tiny_unet(num_class_embeds=classes)  # the same weights, never traced
    traced = TracedForward(network, batches=(4,))
    calls = _python_calls(network)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k in range(4):
            x = torch.randn(4, 1, 8, 8, generator=g)
            t = torch.rand(4, generator=g) * 1000
            labels = None if classes is None else torch.randint(0, classes, (4,), generator=g)
            assert torch.equal(traced(x, t, class_labels=labels).sample, eager(x, t, class_labels=labels).sample)
        assert traced.traced == 1 and traced.eager == 0
        # the first call ran eager (cold), the second eager and then traced (three Python forwards); the
        # other two replayed the trace
        assert len(calls) == 3
        x3 = torch.randn(3, 1, 8, 8, generator=g)
        labels3 = None if classes is None else torch.zeros(3, dtype=torch.long)
        out = traced(x3, torch.full((3,), 10.0), class_labels=labels3, return_dict=False)[0]
        assert len(calls) == 4 and len(traced.traces) == 1  # another batch size: eager, nothing traced
        assert torch.equal(out, eager(x3, torch.full((3,), 10.0), class_labels=labels3).sample)


def test_autograd_training_mode_and_a_python_timestep_run_eager():
    network = build_tiny_unet()
    traced = TracedForward(network, batches=(2,))
    calls = _python_calls(network)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 5.0)
    out = traced(x, t).sample
    assert out.requires_grad and traced.traces == {}  # under autograd: the eager graph, nothing traced
    with torch.no_grad():
        traced(x, 5)
        network.train()
        traced(x, t)
        network.eval()
    assert traced.traces == {} and len(calls) == 3


class _Counting(nn.Module):
    """A forward whose output depends on Python state a trace would freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, 1, 1)
        self.calls = 0

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls += 1
        return (self.conv_in(sample) + self.calls,)


class _Untraceable(_Counting):
    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        if torch.jit.is_tracing():
            raise RuntimeError("no tracing here")
        return (self.conv_in(sample),)


@pytest.mark.parametrize("kind", [_Counting, _Untraceable])
def test_a_trace_that_differs_from_eager_or_fails_leaves_its_signature_eager(kind):
    network = kind().eval()
    traced = TracedForward(network, batches=(2,))
    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2)
    with torch.inference_mode():
        outs = [traced(x, t, return_dict=False)[0] for _ in range(3)]
    assert traced.traced == 0 and traced.eager == 1
    if kind is _Counting:  # every call ran the eager Python: 1, 2 (the trace), 3, 4
        assert network.calls == 4
        torch.testing.assert_close(outs[2] - outs[0], torch.full_like(outs[0], 3.0))


def test_only_the_allowlisted_classes_without_peft_layers_are_traceable():
    from diffusers import UNet2DConditionModel

    from pgraft_cli.models.lora import add_lora

    assert traceable(build_tiny_unet()) and not traceable(None) and not traceable(_Counting())
    cond = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    assert not traceable(cond)
    with_lora = build_tiny_unet()
    add_lora(with_lora, rank=2, alpha=2.0)
    assert not traceable(with_lora)  # its adapter's on/off switch is Python state (network_at toggles it)


def test_traces_outlive_a_stage_but_not_their_network():
    import gc
    import weakref

    from pgraft_cli.models import traced as module

    network = build_tiny_unet()
    with torch.inference_mode():
        first = TracedForward(network, (2,))
        for _ in range(2):  # traced on its second call
            first(torch.randn(2, 1, 8, 8), torch.zeros(2))
        again = TracedForward(network, (2,))
        assert again.traced == 1  # a later stage reuses the trace
        calls = _python_calls(network)
        again(torch.randn(2, 1, 8, 8), torch.zeros(2))
        assert calls == []
    network.conv_in = nn.Conv2d(1, 8, 3, padding=1)  # a module swapped in after the trace was made
    with torch.inference_mode():
        x = torch.randn(2, 1, 8, 8)
        after = TracedForward(network, (2,))
        after(x, torch.zeros(2))
        assert torch.equal(after(x, torch.zeros(2)).sample, network(x, torch.zeros(2)).sample)
        assert after.traced == 2  # a new trace, not the one holding the old convolution
    gone, entries = weakref.ref(network), len(module._TRACES)
    del network, first, again, after, calls
    gc.collect()
    assert gone() is None and len(module._TRACES) <= entries - 1  # its entry went with it


class _NoBar:
    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass


def test_the_sample_and_inversion_stages_trace_long_runs_and_keep_their_bytes(tmp_path, monkeypatch):
    """A run whose full lanes make TRACE_MIN_CALLS network calls runs its network from a trace (made on
    its second call), a shorter one eager; the shards are bitwise the same, the network is given back."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig, SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages import sample as stage
    from pgraft_cli.stages.correct import _invert_shard
    from pgraft_cli.stages.sample import Conditions, run_sample, traced_networks

    model = load_model("digits")
    calls = _python_calls(model.network)
    cfg = SampleConfig(num=4, steps=4, batch_size=4, lane=1)  # 4 full lanes x 4 steps = 16 calls
    shards = {}
    for name, least, python_calls in (("eager", 17, 16), ("traced", 16, 3)):  # eager first: no trace yet
        monkeypatch.setattr(stage, "TRACE_MIN_CALLS", least)
        calls.clear()
        with RunStore(tmp_path / name) as store:
            shards[name] = load_file(str(run_sample(model, cfg, Conditions(), store, _NoBar()).shards[0]))
        assert len(calls) == python_calls  # traced: two calls eager, then the trace's own run
        assert type(model.network).__name__ == "UNet2DModel"  # given back
    assert all(torch.equal(shards["traced"][k], shards["eager"][k]) for k in shards["eager"])

    images = load_data("digits-train", model.sample_shape)[:12]
    inverted = {}
    python_calls = {}
    for name, expected in (("eager", 0), ("traced", 10**6)):
        calls.clear()
        with traced_networks(model, 8, expected):
            inverted[name] = _invert_shard(model, images, replace(CorrectConfig(), inversion_iterations=6), 8,
                                           lambda n: None)
        python_calls[name] = len(calls)
    # the full lane of 8 replayed (its round trip alone is 8 calls); the lane of 4 and the rows still iterating eager
    assert python_calls["traced"] <= python_calls["eager"] - 8
    assert all(torch.equal(inverted["traced"][k], inverted["eager"][k]) for k in inverted["eager"])


# ----------------------------------------------------------------------------------------------
# Lanes and shards side by side, one thread each (stages.sample.map_lanes, side_by_side)


def test_map_lanes_runs_each_lane_on_one_thread_in_order_in_the_callers_mode(monkeypatch):
    import threading
    import time

    from pgraft_cli.stages import sample
    from pgraft_cli.stages.sample import map_lanes

    released = []
    monkeypatch.setattr(sample, "release_free_memory", lambda: released.append(1))
    before = torch.get_num_threads()
    seen = lambda s: (s, torch.get_num_threads(), torch.is_inference_mode_enabled())  # noqa: E731
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            assert map_lanes(seen, range(5), 2) == [(s, 1, True) for s in range(5)]
        assert map_lanes(seen, range(3), None) == [(s, 2, False) for s in range(3)]  # one at a time, all threads
        assert map_lanes(seen, range(1), 2) == [(0, 2, False)]  # fewer lanes than threads: all threads
        assert released == [1]  # after the lanes' threads, not after one thread's loop

        started = []

        def fails(s):
            started.append(s)
            if s == 0:
                raise ValueError("lane 0")
            time.sleep(0.3)
            return s

        stop = threading.Event()
        with pytest.raises(ValueError, match="lane 0"):
            map_lanes(fails, range(8), 2, stop)
        assert len(started) < 8 and stop.is_set()  # the lanes not started cancelled, those under way told to stop
        assert torch.get_num_threads() == 2  # given back, after a failure too
    finally:
        torch.set_num_threads(before)


def _two_threads(monkeypatch, stage: str = "correct"):
    """The inversion (or, with ``stage="sample"``, sampling) decides as on two torch threads, while this
    process keeps its own (under xdist one: two threads a worker beside another worker stall each
    operator's barrier)."""
    import importlib

    module = importlib.import_module(f"pgraft_cli.stages.{stage}")
    real = module.lanes_side_by_side
    monkeypatch.setattr(module, "lanes_side_by_side", lambda model, lane, threads=None: real(model, lane, 2))


def test_lanes_side_by_side_where_they_are_small_on_the_cpu_and_keyed_there_only(tmp_path, monkeypatch):
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages.correct import run_invert
    from pgraft_cli.stages.sample import SIDE_BY_SIDE_VALUES, lanes_side_by_side

    model = load_model("digits")  # 1 x 16 x 16
    big = SIDE_BY_SIDE_VALUES // 256 // 2 + 1  # two such lanes hold more than the budget
    assert lanes_side_by_side(model, 64, 2) == 2 and lanes_side_by_side(model, big, 2) is None
    assert lanes_side_by_side(model, 64, 1) is None  # one thread: nothing to put side by side
    _two_threads(monkeypatch)
    cfg = replace(CorrectConfig(), inversion_iterations=2, max_reconstruction_rms=10.0, invert_shard_size=4)
    images = load_data("digits-train", model.sample_shape)[:4]
    keys = {}
    for lane in (2, big):
        with RunStore(tmp_path / str(lane)) as store:
            run_invert(model, images, cfg, lane, store, _NoBar())
            keys[lane] = store.read_manifest()["stages"]["invert"]["config"]
    assert keys[2]["lanes_side_by_side"] == 2 and "lanes_side_by_side" not in keys[big]


def test_a_resumed_automatic_lane_keeps_the_key_its_shards_were_made_with(tmp_path, monkeypatch):
    """A run directory from before lanes went side by side (no such key) resumed where the new automatic
    lane is too big to go side by side but the recorded one is not: the old shards' key must not match
    (they ran on all threads), so the stage is redone at the new lane, not finished side by side under
    the old key."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages import correct, sample
    from pgraft_cli.stages.correct import run_invert

    model = load_model("digits")
    cfg = replace(CorrectConfig(), inversion_iterations=2, max_reconstruction_rms=10.0, invert_shard_size=4)
    images = load_data("digits-train", model.sample_shape)[:8]
    with RunStore(tmp_path / "run") as store:
        monkeypatch.setattr(correct, "lanes_side_by_side", lambda m, lane, threads=None: None)  # the previous release
        run_invert(model, images[:4], cfg, 2, store, _NoBar())  # one shard of two, at lane 2
        first = store.read_manifest()["stages"]["invert"]
        monkeypatch.undo()
        _two_threads(monkeypatch)
        monkeypatch.setattr(sample, "SIDE_BY_SIDE_VALUES", 2 * 2 * 256)  # lane 2 side by side, lane 4 not
        run_invert(model, images, cfg, 4, store, _NoBar(), auto_lane=True)
        second = store.read_manifest()["stages"]["invert"]
    assert "lanes_side_by_side" not in first["config"]
    assert second["config"]["lane"] == 4 and second["key"] != first["key"]


def test_inversions_are_the_same_bytes_on_any_number_of_threads_traced_or_not():
    """Lanes side by side run on one thread each, so torch's thread count changes nothing: at 6 images a
    call the digits UNet's convolutions round differently on 1 and 2 threads (lanes on all threads did).
    Traced from two lane threads at once, the bytes are the same again."""
    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.data import load_data
    from pgraft_cli.io.recipes import CorrectConfig
    from pgraft_cli.stages.correct import _invert_shard
    from pgraft_cli.stages.sample import lanes_side_by_side
    from pgraft_cli.stages.sample import traced_networks

    model = load_model("digits")
    images = load_data("digits-train", model.sample_shape)[:12]
    cfg = replace(CorrectConfig(), inversion_iterations=4)
    before, outputs = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # the lanes side by side take two threads of their own
    try:
        for name, threads, calls in (("one thread", 1, 0), ("side by side", 2, 0), ("traced", 2, 10**6)):
            with traced_networks(model, 6, calls):
                outputs[name] = _invert_shard(model, images, cfg, 6, lambda n: None,
                                              side_by_side=lanes_side_by_side(model, 6, threads))
                if name == "traced":
                    assert model.network.traced == 1
    finally:
        torch.set_num_threads(before)
    for name in ("side by side", "traced"):
        assert all(torch.equal(outputs["one thread"][k], outputs[name][k]) for k in outputs[name]), name


def test_a_network_slower_than_the_trace_could_repay_stays_eager(monkeypatch):
    from pgraft_cli.models import traced as module

    monkeypatch.setattr(module, "TRACE_MAX_CALL_SECONDS", 0.0)  # every eager call is "too slow"
    network = build_tiny_unet()
    forward = TracedForward(network, batches=(2,))
    calls = _python_calls(network)
    with torch.inference_mode():
        for _ in range(4):
            forward(torch.randn(2, 1, 8, 8), torch.zeros(2))
    assert forward.traced == 0 and forward.eager == 1 and len(calls) == 4  # no trace made, every call eager


def test_sample_shards_side_by_side_have_the_bytes_of_one_thread_fresh_or_resumed(tmp_path, monkeypatch):
    """Where the lane is small, a CPU sample stage of at least as many shards as torch has threads runs
    its shards side by side, one thread each, keyed so. At 6 images a call the digits UNet rounds
    differently on one and two threads, so the bytes must be one thread's: in a fresh stage, and when a
    resumed stage has a single shard left (decided from the settings, not from what is left)."""
    import threading

    from pgraft_cli.io.checkpoints import load_model
    from pgraft_cli.io.recipes import SampleConfig
    from pgraft_cli.io.runstore import RunStore
    from pgraft_cli.stages import sample
    from pgraft_cli.stages.sample import Conditions, run_sample, shards_side_by_side

    model = load_model("digits")
    cfg = SampleConfig(num=24, steps=2, batch_size=6, lane=6)  # 4 shards of one lane
    assert shards_side_by_side(model, cfg, 4, threads=2) == 2 and shards_side_by_side(model, cfg, 4, threads=1) is None
    assert shards_side_by_side(model, cfg, 3, threads=2) is None  # fewer than two rounds: all threads on each
    assert shards_side_by_side(model, replace(cfg, compile=True), 4, threads=2) is None
    assert shards_side_by_side(model, replace(cfg, lane=sample.SIDE_BY_SIDE_VALUES // 256), 4, threads=2) is None

    ran_on = []
    real_shard = sample._shard_tensors

    def shard(*args, **kwargs):
        ran_on.append((threading.current_thread().name.startswith("pgraft-lane"), torch.get_num_threads()))
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(sample, "_shard_tensors", shard)
    before, runs = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # the reference: one thread; side by side takes two threads of its own
    try:
        with RunStore(tmp_path / "one") as store:
            runs["one thread"] = run_sample(model, cfg, Conditions(), store, _NoBar())
        assert "threads_per_shard" not in runs["one thread"].settings
        _two_threads(monkeypatch, "sample")
        ran_on.clear()
        with RunStore(tmp_path / "both") as store:
            runs["side by side"] = run_sample(model, cfg, Conditions(), store, _NoBar())
            assert runs["side by side"].settings["threads_per_shard"] == 1 and ran_on == [(True, 1)] * 4
            # the shards' seconds are the stage's wall time shared out, not the overlapping threads' own times
            assert store.stage("sample").seconds() <= runs["side by side"].seconds
            assert torch.get_num_threads() == 1  # given back (the caller's one thread)
            first = [load_file(str(p)) for p in runs["side by side"].shards]
            runs["side by side"].shards[3].unlink()  # a stage with one shard left
            ran_on.clear()
            resumed = run_sample(model, cfg, Conditions(), store, _NoBar())
            assert ran_on == [(True, 1)] and resumed.generated == 6
            first[3] = load_file(str(resumed.shards[3]))
    finally:
        torch.set_num_threads(before)
    reference = [load_file(str(p)) for p in runs["one thread"].shards]
    for mine, theirs in zip(first, reference):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_leaving_side_by_side_early_stops_the_items_under_way_through_its_event():
    """An error while the caller handles an item, or Ctrl-C, closes the iteration: the items not started
    are cancelled and ``stop`` is set, so an item that checks it (the sample stage, every step) ends
    within a step instead of the pool waiting for it; a full iteration leaves ``stop`` clear."""
    import threading
    import time

    from pgraft_cli.stages.sample import side_by_side

    started = []

    def item(i, stop):
        started.append(i)
        for _ in range(300):  # up to 3 s, checking every 10 ms
            if i == 0:
                return i
            if stop.is_set():
                raise RuntimeError("stopped")
            time.sleep(0.01)
        return i

    stop = threading.Event()
    results = side_by_side(lambda i: item(i, stop), range(6), 2, stop)
    assert next(results) == 0
    tic = time.perf_counter()
    results.close()  # the caller leaves with item 1 under way
    assert stop.is_set() and time.perf_counter() - tic < 1.0 and len(started) < 6
    clear = threading.Event()
    assert list(side_by_side(lambda i: i * i, range(5), 2, clear)) == [0, 1, 4, 9, 16] and not clear.is_set()
