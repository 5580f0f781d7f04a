"""The corrector's training step in float32 and under bf16 autocast, at 2 threads and 1, side by side.

    python bench/corrector_autocast.py --steps 60 --rounds 3

Runs the main job's corrector training (``run_train_corrector`` with the ``inverse-noise`` recipe:
UNet2DModel [16, 32, 32], batch 128, fused AdamW, EMA, clipping) for ``--steps`` steps on 1078
random noises of the digits' shape, in a fresh run directory each time, with
``correct.corrector_mixed_precision`` "no" and "bf16", at ``torch.set_num_threads`` 2 and 1.
Rounds are interleaved (the order of the two settings alternates round by round) after one warm-up
run of each; prints wall and CPU ms per step (the whole stage's wall time over the steps: building the
network and writing the result included, under 1 ms a step), the median of the rounds and each
round, the ratio to float32 at the same thread count (of the medians, and the median of each round's
ratio: on a shared box a round's two runs share its load), the fastest round, and the load average.
The process first sets glibc's allocator as the ``pgraft`` command does (``io.host.tune_allocator``;
``--allocator default`` leaves glibc's defaults, whose page faults slow float32's larger steps most).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pgraft_cli.io.host import tune_allocator  # noqa: E402
from pgraft_cli.io.recipes import load_recipe  # noqa: E402
from pgraft_cli.io.runstore import RunStore  # noqa: E402
from pgraft_cli.report.ui import progress  # noqa: E402
from pgraft_cli.stages.correct import run_train_corrector  # noqa: E402

SETTINGS = ("no", "bf16")


def ms_per_step(setting: str, threads: int, steps: int, noises: torch.Tensor) -> tuple[float, float]:
    """Wall and CPU (``time.process_time``, all threads) milliseconds per step."""
    torch.set_num_threads(threads)
    cfg = load_recipe("inverse-noise", [f"correct.corrector_train_steps={steps}", "correct.corrector_checkpoint_every=100000",
                                        f"correct.corrector_mixed_precision={setting}"]).correct
    with tempfile.TemporaryDirectory() as d, RunStore(Path(d)) as store, progress(False) as bar:
        tic, cpu = time.perf_counter(), time.process_time()
        run_train_corrector(noises, (1, 16, 16), cfg, "bench", store, bar)
        return 1000 * (time.perf_counter() - tic) / steps, 1000 * (time.process_time() - cpu) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                    help="tuned: glibc's allocator as the pgraft command sets it (the default); default: glibc's own")
    a = ap.parse_args()
    if a.allocator == "tuned":
        tune_allocator()
    noises = torch.randn(1078, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    before = os.getloadavg()
    for threads in a.threads:  # warm-up: oneDNN builds its kernels on first use
        for setting in SETTINGS:
            ms_per_step(setting, threads, 5, noises)
    ms: dict[tuple[int, str], list[tuple[float, float]]] = {(t, s): [] for t in a.threads for s in SETTINGS}
    for r in range(a.rounds):
        for threads in a.threads:
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                ms[threads, setting].append(ms_per_step(setting, threads, a.steps, noises))
    after = os.getloadavg()
    print(f"corrector training, {a.steps} steps x batch 128, {a.rounds} interleaved rounds, allocator {a.allocator}; "
          f"torch {torch.__version__}; "
          f"load average {before[0]:.1f} before, {after[0]:.1f} after")
    print("| threads | corrector_mixed_precision | wall ms/step, median | rounds | / float32 | fastest round | / float32, "
          "paired by round (median) | CPU ms/step, median | / float32 |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    med = {key: [statistics.median(v[i] for v in values) for i in (0, 1)] for key, values in ms.items()}
    for (threads, setting), (wall, cpu) in med.items():
        base, walls = med[threads, "no"], [v[0] for v in ms[threads, setting]]
        paired = statistics.median(w / v[0] for w, v in zip(walls, ms[threads, "no"]))
        print(f"| {threads} | {setting} | {wall:.1f} | {' '.join(f'{w:.1f}' for w in walls)} | {wall / base[0]:.2f} | "
              f"{min(walls):.1f} | {paired:.2f} | {cpu:.1f} | {cpu / base[1]:.2f} |")


if __name__ == "__main__":
    main()
