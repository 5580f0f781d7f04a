"""Held-out FID of corrector variants on the main job's cached inversion, paired over evaluation seeds.

    OMP_NUM_THREADS=1 python bench/corrector_kinds.py "gauss;unet;unet:correct.corrector_lr_decay~cosine" --seeds 1 2 3

Variants are separated by ``;``, their parts by ``:`` (``~`` stands for ``=`` in recipe overrides):
``gauss[:SCALE]`` the full-covariance Gaussian of the inverted noises (spread times SCALE);
``temp:S`` no corrector but noise S e (a temperature); ``KIND:KEY~VALUE:...`` a corrector trained by
``run_train_corrector`` with those recipe overrides (``mlp``/``unet`` by ``correct.corrector``;
``unet`` with no overrides is today's recipe); ``wmlp:...`` an MLP flow trained on the whitened
noises ``L^-1 (z - mean)`` and mapped back through the Gaussian; ``file:PATH:STEPS`` a corrected
checkpoint's corrector sampled with STEPS Euler steps (``file:PATH:STEPS:heun``: STEPS Heun steps,
2 STEPS network calls). Each variant is trained once and sampled
1000 times from each evaluation seed (``--seeds``, default 1; the same noises for every variant)
at 8 base steps, its FID measured against held-out ``digits-test`` with the bundled classifier's
features (the main job's protocol). The inversion (the recipe's, all 1078 training digits, or
``--images``) is cached under ``--out``; ``--use N`` trains every variant on its first N noises.
Prints one row per variant: training steps x batch, training TFLOPs (steps x batch x the network's
forward + backward FLOPs per image, ``torch.utils.flop_counter``'s count), the corrector's network
calls per sample, training wall and CPU seconds (``time.process_time``, steadier on a shared box),
FID per seed and their mean, load average.

``--inversions "default;correct.inversion_tol_last~0.01"`` repeats all that per inversion setting
(recipe overrides, parts by ``:``; each cached in its own ``--out``-suffixed run directory) and
prints, per setting, the inversion's network calls per image (per grid step, the data's step first,
round trip excluded), round-trip RMS mean / max and dropped images:

    OMP_NUM_THREADS=1 python bench/corrector_kinds.py unet --seeds 1 2 3 --inversions "default;correct.inversion_tol_last~0.01"
"""
import argparse
import os
import sys
import tempfile
import time
from unittest import mock
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pgraft_cli.io.checkpoints import load_model  # noqa: E402
from pgraft_cli.io.data import data_rows, iter_data  # noqa: E402
from pgraft_cli.io.recipes import SampleConfig, load_recipe  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.models.corrector import NoiseCorrector, fit_gaussian  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402
from pgraft_cli.stages.correct import corrector_network, run_invert, run_train_corrector  # noqa: E402
from pgraft_cli.stages.sample import resolve_lane  # noqa: E402
from pgraft_cli.stages.evaluate import classifier_features, evaluate_model, reference  # noqa: E402

@dataclass
class Whitened(NoiseCorrector):
    w_mean: Optional[Tensor] = None
    w_chol: Optional[Tensor] = None
    def __call__(self, noise):
        y = super().__call__(noise).reshape(noise.shape[0], -1).double()
        return (self.w_mean.double() + y @ self.w_chol.double().T).to(noise.dtype).reshape(noise.shape)

class Heun(NoiseCorrector):
    """The corrector's flow integrated by Heun's method (2nd order): ``d = v(x, t)``,
    ``x' = x + h (d + v(x + h d, t')) / 2``; two network calls per step (unconditioned flows)."""

    def __call__(self, noise, condition=None):
        grid = self.schedule.grid(self.steps)
        x = noise.to(next(self.network.parameters()).dtype)
        with torch.no_grad():
            for t, t_next in zip(grid[:-1], grid[1:]):
                h = float(t_next - t)
                d = self.velocity(x, t)
                x = x + h / 2 * (d + self.velocity(x + h * d, t_next))
        return x.to(noise.dtype)


def train_flops(cfg) -> int:
    """Forward + backward FLOPs of one training image of the recipe's corrector network (flop_counter's count)."""
    from torch.utils.flop_counter import FlopCounterMode
    net, _ = corrector_network(cfg, (1, 16, 16))
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(2, 1, 16, 16), torch.rand(2) * 1000).sample.square().mean().backward()
    return counter.get_total_flops() // 2


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("variants")
ap.add_argument("--seeds", type=int, nargs="+", default=[int(os.environ.get("SEED", 1))])
ap.add_argument("--images", type=int, default=0, help="training digits to invert (0 = all 1078)")
ap.add_argument("--use", type=int, default=0,
                help="train on the first N inverted noises only (0 = all; the inversion is per image, so this is "
                     "the inversion of correct.num_images = N at a fraction of its cost)")
ap.add_argument("--out", default="bench/runs/curve-mlp")
ap.add_argument("--inversions", default="default", help="inversion settings, ';'-separated (see above)")
a = ap.parse_args()
variants = a.variants.split(";")
model = load_model("digits")
feats = classifier_features()
ref = reference(feats, iter_data("digits-test", model.image_shape))
predict, rows, inv_rows = model.predict, [], []


def counted(calls):
    """``model.predict`` that adds each call's batch to ``calls[t]`` (network calls per grid time)."""
    def fn(x, t, cond):
        calls[float(t)] = calls.get(float(t), 0) + len(x)
        return predict(x, t, cond)
    return fn


for setting in a.inversions.split(";"):
    sets = [] if setting == "default" else [s.replace("~", "=") for s in setting.split(":")]
    rec = load_recipe("inverse-noise", [f"correct.num_images={a.images}", *sets])
    lane = resolve_lane(model, SampleConfig(num=rec.correct.invert_shard_size, batch_size=rec.correct.invert_shard_size)).lane
    out = a.out if setting == "default" else a.out + "-" + "-".join(s.split("~")[-1] for s in setting.split(":"))
    with RunStore(out) as store, progress(False) as bar:
        tic, evals = time.perf_counter(), {}
        model.predict = counted(evals)
        noises, inv, _ = run_invert(model, data_rows("digits-train", model.image_shape).head(a.images), rec.correct, lane, store, bar)
        model.predict = predict
        grid = model.schedule.grid(rec.correct.base_steps)[:-1].flip(0)  # the data's step first
        per_step = " ".join(f"{evals[float(t)] / inv['num'] - 1:.1f}" for t in grid) if evals else "cached"
        inv_rows.append(f"| {setting} | {inv['iterations_mean']:.2f} | {per_step} | {inv['reconstruction_rms_mean']:.2e} / "
                        f"{inv['reconstruction_rms_max']:.2e} | {inv['dropped']} of {inv['num']} | "
                        f"{time.perf_counter() - tic:.1f} | {os.getloadavg()[0]:.1f} |")
        print(inv_rows[-1], flush=True)
        noises = noises[:a.use] if a.use else noises
        mean, chol = fit_gaussian(noises)
        for v in variants:
            name, *sets = v.split(":")
            tic, cpu = time.perf_counter(), time.process_time()
            kind = name.split("-")[0]
            budget, tflops = "-", "-"
            if kind == "file":
                corr = load_model(sets[0].replace("~", "=")).corrector
                corr.steps = int(sets[1])
                if sets[2:] == ["heun"]:
                    corr = Heun(**{f: getattr(corr, f) for f in ("kind", "base_steps", "steps", "network", "model_config")})
            elif kind == "gauss":
                scale = float(sets[0]) if sets else 1.0
                corr = NoiseCorrector("gaussian", 8, 0, mean=mean.float(), chol=(scale * chol).float())
            elif kind == "temp":
                corr = NoiseCorrector("gaussian", 8, 0, mean=torch.zeros(256), chol=float(sets[0]) * torch.eye(256))
            else:
                r = load_recipe("inverse-noise", [s.replace("~", "=") for s in sets])
                budget = f"{r.correct.corrector_train_steps} x {r.correct.corrector_batch_size}"
                steps_images = r.correct.corrector_train_steps * r.correct.corrector_batch_size
                tflops = f"{steps_images * train_flops(r.correct) / 1e12:.2f}"
                train = noises
                if kind == "wmlp":
                    flat = noises.reshape(len(noises), -1).double()
                    train = torch.linalg.solve_triangular(chol, (flat - mean).T, upper=False).T.float().reshape(noises.shape)
                # unet-fused / unet-foreach: the corrector's AdamW on that path of torch's (the stage's own choice otherwise)
                path = {"fused": {"fused": True, "foreach": None}, "foreach": {"fused": None, "foreach": True}}.get(
                    name.partition("-")[2], {})
                adamw = torch.optim.AdamW
                with tempfile.TemporaryDirectory() as d, RunStore(d) as s2, mock.patch(
                        "torch.optim.AdamW", lambda params, **kw: adamw(params, **{**kw, **path})):
                    corr, info = run_train_corrector(train, (1, 16, 16), r.correct, "x", s2, bar)
                if kind == "wmlp":
                    corr = Whitened(**{f: getattr(corr, f) for f in ("kind", "base_steps", "steps", "network", "model_config")},
                                    w_mean=mean.float(), w_chol=chol.float())
            train_s, train_cpu = time.perf_counter() - tic, time.process_time() - cpu
            model.corrector = corr
            fids = []
            for seed in a.seeds:
                cfg = SampleConfig(num=1000, seed=seed, steps=8, batch_size=rec.sample.batch_size, lane=rec.sample.lane)
                tag = ("" if setting == "default" else out.split("/")[-1] + "-") + v.replace(":", "_").replace("~", "").replace("[", "").replace("]", "").replace(",", "-").replace("/", "-")
                fids.append(evaluate_model(model, None, cfg, feats, store, bar, f"x{seed}-{tag}", real_features=ref)["fid"])
            heun = isinstance(corr, Heun) or corr.sampler == "heun"
            calls = 0 if corr.network is None else corr.steps * (2 if heun else 1)
            row = (f"| {setting} | {v} | {budget} | {tflops} | {calls} | {train_s:.1f} | {train_cpu:.1f} | "
                   + " | ".join(f"{f:.3f}" for f in fids) + f" | {sum(fids) / len(fids):.3f} | {os.getloadavg()[0]:.1f} |")
            rows.append(row)
            print(row, flush=True)
print("\n| inversion | calls per image | calls per step (data's step first) | round-trip RMS mean / max | dropped | "
      "seconds (0 cached) | load |")
print("|---|---:|---|---|---:|---:|---:|")
print("\n".join(inv_rows))
print("\n| inversion | variant | training steps x batch | training TFLOPs | corrector calls | training s | "
      "training CPU s | " + " | ".join(f"FID seed {s}" for s in a.seeds) + " | mean | load |")
print("|---|---|---|---:|---:|---:|---:|" + "---:|" * (len(a.seeds) + 2))
print("\n".join(rows))
