"""Held-out FID of corrector variants on the main job's cached inversion, one variant after another.

    OMP_NUM_THREADS=1 SEED=1 python bench/corrector_kinds.py "gauss;temp:0.9;mlp:correct.corrector~mlp"

Variants are separated by ``;``, their parts by ``:`` (``~`` stands for ``=`` in recipe overrides):
``gauss[:SCALE]`` the full-covariance Gaussian of the inverted noises (spread times SCALE);
``temp:S`` no corrector but noise S e (a temperature); ``KIND:KEY~VALUE:...`` a corrector trained by
``run_train_corrector`` with those recipe overrides (``mlp``/``unet`` by ``correct.corrector``);
``wmlp:...`` an MLP flow trained on the whitened noises ``L^-1 (z - mean)`` and mapped back through
the Gaussian; ``file:PATH:STEPS`` a corrected checkpoint's corrector sampled with STEPS Euler steps.
Each is sampled 1000 times from evaluation seed ``$SEED`` (default 1) at 8 base steps and its FID
measured against held-out ``digits-test`` with the bundled classifier's features (the main job's
protocol). The inversion (the recipe's, all 1078 training digits) is cached in
``bench/runs/curve-mlp``. Prints one row per variant: training seconds, FID, load average.
"""
import os
import sys
import tempfile
import time
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
from pgraft_cli.stages.correct import run_invert, run_train_corrector  # noqa: E402
from pgraft_cli.stages.evaluate import classifier_features, evaluate_model, reference  # noqa: E402

@dataclass
class Whitened(NoiseCorrector):
    w_mean: Optional[Tensor] = None
    w_chol: Optional[Tensor] = None
    def __call__(self, noise):
        y = super().__call__(noise).reshape(noise.shape[0], -1).double()
        return (self.w_mean.double() + y @ self.w_chol.double().T).to(noise.dtype).reshape(noise.shape)

variants = sys.argv[1].split(";")
rec = load_recipe("inverse-noise", [])
model = load_model("digits")
feats = classifier_features()
ref = reference(feats, iter_data("digits-test", model.image_shape))
out = "bench/runs/curve-mlp"
with RunStore(out) as store, progress(False) as bar:
    noises, inv = run_invert(model, data_rows("digits-train", model.image_shape).head(0), rec.correct, rec.sample.lane, store, bar)
    mean, chol = fit_gaussian(noises)
    for v in variants:
        name, *sets = v.split(":")
        tic = time.perf_counter()
        kind = name.split("-")[0]
        if kind == "file":
            corr = load_model(sets[0].replace("~", "=")).corrector
            corr.steps = int(sets[1])
        elif kind == "gauss":
            scale = float(sets[0]) if sets else 1.0
            corr = NoiseCorrector("gaussian", 8, 0, mean=mean.float(), chol=(scale * chol).float())
        elif kind == "temp":
            corr = NoiseCorrector("gaussian", 8, 0, mean=torch.zeros(256), chol=float(sets[0]) * torch.eye(256))
        else:
            r = load_recipe("inverse-noise", [s.replace("~", "=") for s in sets])
            train = noises
            if kind == "wmlp":
                flat = noises.reshape(len(noises), -1).double()
                train = torch.linalg.solve_triangular(chol, (flat - mean).T, upper=False).T.float().reshape(noises.shape)
            with tempfile.TemporaryDirectory() as d, RunStore(d) as s2:
                corr, info = run_train_corrector(train, (1, 16, 16), r.correct, "x", s2, bar)
            if kind == "wmlp":
                corr = Whitened(**{f: getattr(corr, f) for f in ("kind", "base_steps", "steps", "network", "model_config")},
                                w_mean=mean.float(), w_chol=chol.float())
        train_s = time.perf_counter() - tic
        model.corrector = corr
        seed = int(os.environ.get("SEED", 1))
        cfg = SampleConfig(num=1000, seed=seed, steps=8, batch_size=rec.sample.batch_size, lane=rec.sample.lane)
        m = evaluate_model(model, None, cfg, feats, store, bar, f"x{seed}-" + v.replace(":", "_").replace("~", "").replace("[", "").replace("]", "").replace(",", "-"), real_features=ref)
        print(f"| seed {seed} | {v} | {train_s:.1f} | {m['fid']:.3f} | load {os.getloadavg()[0]:.1f}", flush=True)
