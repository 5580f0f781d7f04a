"""The filter stage: keep samples by a rejection rule (the maths is in ``selection.py``).

Groups for ``top_k``/``best_of_n`` are the samples of one prompt (text models), of one class
(class models), or ``m`` consecutive samples (unconditional models). The stage writes
``filter/kept.safetensors`` (``index``, ``keep``, ``reward``, ``group``) and ``filter/summary.json``:
how many were kept, the reward distribution before and after, and the reshaped reward of the rule.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PgraftError
from ..io.recipes import FilterConfig
from ..io.runstore import RunStore, atomic_path, read_shard
from .score import load_rewards, stage_outputs_digest
from ..core.selection import condition_groups, select, summarize, threshold_value

STAGE = "filter"


def sample_conditions(run_dir: Path, sample_stage: str) -> tuple[Tensor, Tensor]:
    """``(index, condition)`` of every sample: its prompt index, class label, or 0 (unconditional).

    ``condition_groups(condition, m)`` then puts the j-th sample of a prompt (or class; an unconditional
    model has one) in that prompt's group ``j // m``, so ``sample.num = m x prompts`` gives each prompt one
    group of m, and more samples give each prompt several.
    """
    found = RunStore(run_dir, is_main=False).stage(sample_stage).tensors("index", "prompt_index", "class_label")
    index = found["index"]
    return index, found.get("prompt_index", found.get("class_label", torch.zeros_like(index)))


def run_filter(store: RunStore, cfg: FilterConfig, sample_stage: str = "sample", score_stage: str = "score",
               stage_name: str = STAGE) -> dict[str, Any]:
    """Select (or reuse the selection of) the scored samples; returns the summary dict."""
    from safetensors.torch import save_file

    config = asdict(cfg)
    inputs = {"score": stage_outputs_digest(store, score_stage), "sample": stage_outputs_digest(store, sample_stage)}
    stage = store.open_stage(stage_name, config, inputs)
    kept_path, summary_path = stage.dir / "kept.safetensors", stage.dir / "summary.json"
    if not stage.done:
        index, rewards = load_rewards(store.root, score_stage)
        g_index, cond = sample_conditions(store.root, sample_stage)
        groups = condition_groups(cond, cfg.m)
        if not torch.equal(index, g_index):
            raise PgraftError(f"the score stage of {store.root} does not cover the sample stage; re-run `pgraft score`")
        samples = store.stage(sample_stage).tensors("samples")["samples"] if cfg.dedup else None
        rule = cfg.rule
        keep = select(rule, rewards, groups, k=cfg.k if rule == "top_k" else 1, m=cfg.m, threshold=cfg.threshold,
                      quantile=cfg.quantile, dedup=cfg.dedup, samples=samples, dedup_tol=cfg.dedup_tol)
        if not bool(keep.any()):
            raise PgraftError(f"filter rule {rule} kept no samples; lower filter.threshold or filter.quantile")
        params = rule_params(cfg, rewards)
        summary = summarize(rewards, keep, rule, params, conditions=cond).to_dict()
        summary["rule"], summary["params"] = rule, params
        stage.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept_path) as tmp:
            save_file({"index": index, "keep": keep.to(torch.bool), "reward": rewards.double(),
                       "group": groups}, str(tmp))
        store.write_json(str(summary_path.relative_to(store.root)), summary)
        if store.is_main:
            stage.finish([kept_path, summary_path])
    return json.loads(summary_path.read_text())


def rule_params(cfg: FilterConfig, rewards: Tensor) -> dict[str, Any]:
    """The parameters of the rule's acceptance formula (docs/methods.md section 1)."""
    if cfg.rule == "top_k":
        return {"k": cfg.k, "m": cfg.m}
    if cfg.rule == "best_of_n":
        return {"n": cfg.m}
    return {"threshold": threshold_value(rewards, value=cfg.threshold, quantile=cfg.quantile)}


def load_kept(run_dir: Path, stage_name: str = STAGE) -> Tensor:
    """The indices of the samples a filter stage kept."""
    path = Path(run_dir) / stage_name / "kept.safetensors"
    if not path.is_file():
        raise PgraftError(f"{run_dir} has no '{stage_name}' outputs; run `pgraft filter {run_dir}` first")
    kept = read_shard(path, "index", "keep")
    return kept["index"][kept["keep"]]
