"""The score stage: the reward of every sampled image, sharded like the sample stage it reads.

Score shard ``k`` holds the rewards of sample shard ``k`` (``index``, ``reward``), so scoring
resumes shard by shard and, in ``pgraft finetune``'s rounds, splits across ``accelerate`` processes like
sampling does (the ``pgraft score`` verb runs in one process). The stage key
holds the digest of the sample stage's outputs and the reward's spec, identity and batch size: a
new reward re-runs scoring (and everything after it), never sampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from ..errors import PgraftError
from ..io.runstore import Dist, RunStore, read_shard

STAGE = "score"


def stage_outputs_digest(store: RunStore, name: str) -> str:
    """The digest of a finished stage's outputs in ``store`` (a key input); a clear error when it has not run."""
    digest = store.outputs_digest(name)
    if digest is None:
        verb = name.split("-")[0]
        how = {"sample": f"pgraft sample MODEL --run-dir {store.root}",
               "score": f"pgraft score {store.root} --reward NAME"}.get(verb, f"pgraft {verb} {store.root}")
        raise PgraftError(f"{store.root} has no finished '{name}' stage; run `{how}` first")
    return digest


def sample_prompts(run_dir: Path, sample_stage: str) -> Optional[list[str]]:
    """The prompt list a sample stage used (text models), from its settings file."""
    settings = Path(run_dir) / sample_stage / "settings.json"
    if not settings.is_file():
        return None
    return json.loads(settings.read_text()).get("prompts")


def shard_prompts(shard: dict[str, Tensor], prompts: Optional[list[str]]) -> Optional[list[str]]:
    if "prompt_index" not in shard or not prompts:
        return None
    return [prompts[int(i)] for i in shard["prompt_index"]]


def run_score(store: RunStore, reward: Any, bar: Any, sample_stage: str = "sample", stage_name: str = STAGE,
              process_index: int = 0, num_processes: int = 1, barrier: Any = None) -> Tensor:
    """Score (or resume scoring) every image of ``sample_stage``; returns rewards in index order."""
    samples = stage_outputs_digest(store, sample_stage)
    sample_shards = store.stage(sample_stage).paths()
    prompts = sample_prompts(store.root, sample_stage)
    task = None

    def todo(mine: list[int]) -> None:
        nonlocal task
        task = bar.add_task(f"scoring ({reward.name})", total=len(mine), unit="shard")

    def work(k: int) -> dict[str, Tensor]:
        shard = read_shard(sample_shards[k], "index", "images", "prompt_index")  # not samples/captured
        images = shard["images"].permute(0, 3, 1, 2).float() / 255.0
        scores = reward(images, shard_prompts(shard, prompts))  # checked: one finite score per image
        bar.advance(task, 1)
        return {"index": shard["index"], "reward": scores.double().contiguous()}

    store.run_sharded(stage_name, {"reward": reward.spec, "batch_size": getattr(reward, "batch_size", None)},
                      {"sample": samples, "reward_identity": getattr(reward, "identity", reward.spec)},
                      len(sample_shards), work, Dist(process_index, num_processes, barrier), todo=todo)
    return load_rewards(store.root, stage_name)[1]


def load_rewards(run_dir: Path, stage_name: str = STAGE) -> tuple[Tensor, Tensor]:
    """``(index, reward)`` of a score stage, in index order."""
    found = RunStore(run_dir, is_main=False).stage(stage_name).tensors("index", "reward")
    if not found:
        raise PgraftError(f"{run_dir} has no '{stage_name}' outputs; run `pgraft score {run_dir} --reward R` first")
    return found["index"], found["reward"]


def reward_stats(rewards: Tensor) -> dict[str, float]:
    """Mean and population std of the rewards (as the filter's summary and best-of-n report them)."""
    r = rewards.double()
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std(correction=0)) if len(r) else 0.0,
            "num": int(len(r))}

