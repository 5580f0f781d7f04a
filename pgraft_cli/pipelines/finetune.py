"""GRAFT / P-GRAFT verbs: ``pgraft score`` and ``pgraft filter`` on a run, and ``pgraft finetune``'s rounds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import PgraftError
from .skeleton import (Options, Verb, default_run_dir, open_run, prompt_list,
                       real_data, references, resolve_recipe, reward_from, start)


def score(run_dir: Path, reward: Optional[str], stage: str, recipe: str, sets: Optional[list[str]],
          quiet: bool) -> dict[str, Any]:
    """Score the images of a run's sample ``stage`` (``score`` for ``sample``, ``score-r2`` for ``sample-r2`` ...)."""
    from ..report.ui import progress
    from ..stages.score import reward_stats, run_score

    rec = resolve_recipe(recipe, sets, score__reward=reward)
    rew = reward_from(rec.score.reward, batch_size=rec.score.batch_size)
    score_stage = stage.replace("sample", "score", 1)
    with open_run(run_dir) as store, progress(not quiet) as bar:
        rewards = run_score(store, rew, bar, stage, score_stage)
    return {"run_dir": str(run_dir), "reward": rew.spec, "stage": score_stage, **reward_stats(rewards)}


def filter_(run_dir: Path, stage: str, recipe: str, sets: Optional[list[str]], **flags: Any) -> dict[str, Any]:
    """Keep a run's scored samples by the recipe's rule (``flags``: ``filter__rule=...`` overrides)."""
    from ..stages.filter import run_filter

    rec = resolve_recipe(recipe, sets, **flags)
    names = {s: stage.replace("sample", s, 1) for s in ("score", "filter")}
    with open_run(run_dir) as store:
        return run_filter(store, rec.filter, stage, names["score"], names["filter"])


@dataclass
class FinetuneOptions(Options):
    """What ``pgraft finetune`` takes besides MODEL (None: the recipe's value)."""

    reward: Optional[str] = None
    cutoff: Optional[float] = None
    out: Optional[Path] = None
    rounds: Optional[int] = None
    lora_rank: Optional[int] = None
    data: Optional[str] = None
    eval_data: Optional[str] = None
    prompt: Optional[list[str]] = None
    prompts: Optional[Path] = None
    class_label: Optional[int] = None
    features: Optional[str] = None
    recipe: str = "pgraft"


def finetune(model: str, o: FinetuneOptions) -> Optional[tuple[dict[str, Any], list[Any]]]:
    """Rounds of sample -> score -> filter -> fine-tune, base vs tuned, the tuned file and the report.

    Returns the summary and the gate results (None on processes other than the main one).
    """
    from ..io.checkpoints import base_info_of, save_finetuned
    from ..report.gates import gate_metrics, gate_names, parse_gates
    from ..stages.evaluate import fid_skipped, pick_features
    from ..stages.finetune import evaluate_pair, resolve_lora, run_rounds, tuning_choice
    from ..stages.sample import Conditions, check_conditions

    gates = parse_gates(o.fail_if, gate_names("finetune"))
    rec = resolve_recipe(o.recipe, o.sets, score__reward=o.reward, finetune__cutoff=o.cutoff,
                         finetune__rounds=o.rounds, finetune__lora_rank=o.lora_rank,
                         evaluate__features=o.features)
    cond = Conditions(prompts=prompt_list(o.prompt, o.prompts) or None, class_label=o.class_label)
    verb: Verb = start("finetune", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet)
    loaded, dev = verb.model, verb.device
    if loaded.corrector is not None or loaded.finetuned:
        raise PgraftError(f"{model} is a corrected or fine-tuned file; pass its base model to fine-tune")
    check_conditions(loaded, cond)
    rec = replace(rec, finetune=resolve_lora(loaded, rec.finetune))  # the run dir's recipe.toml keeps "auto"
    rew = reward_from(rec.score.reward, dev, rec.score.batch_size)
    base_info = base_info_of(loaded)
    real, data_id = (None, None)
    if o.data or loaded.default_data:
        real, data_id = real_data(loaded, o.data)  # streamed: only the FID reference reads it
    # The default run directory depends only on what sampling depends on, so that a new reward,
    # rule or training setting re-runs scoring onwards in the same run, never sampling.
    run_dir = o.run_dir or default_run_dir("finetune", {"model": loaded.identity, "sample": rec.to_dict()["sample"],
                                                         "cutoff": rec.finetune.cutoff, "prompts": cond.prompts})
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev,
                          reward_identity=rew.identity) if data_id is not None else None
    notes = [] if feats is not None else [fid_skipped(rec.evaluate.features, data_id is not None)]
    with verb.run_dir(run_dir) as store:
        fid_of, fid_data, refs = None, None, {}
        if feats is not None:
            fid_data, refs = references(loaded, o.data, o.eval_data, real, data_id, feats, rec.evaluate.kid_subsets, store.root)

            def fid_of(images: Any) -> float:  # each round's samples against the same reference
                ref = refs[fid_data]
                ref.reset_generated()
                ref.update(feats(images), real=False)
                return ref.compute()["fid"]
        dist = verb.dist
        history = run_rounds(loaded, rec, rew, cond, store, verb.bar, dist.rank, dist.size, dist.barrier, fid_of=fid_of)
        if not verb.is_main:
            return None
        metrics = evaluate_pair(loaded, rec, rew, cond, feats, store, verb.bar, refs, fid_data, notes)
        metrics["rounds"] = [{k: v for k, v in h.items() if k not in ("filter", "loss_curve")} for h in history]
        metrics["reward"], metrics["data"], metrics["fid_data"] = rew.spec, data_id, fid_data
        target = o.out or store.root / "tuned.safetensors"
        save_finetuned(target, loaded, base_info, rec.finetune, metrics, rec.to_dict())
        store.write_json("finetune/summary.json", {**metrics, "out": str(target), "cutoff": rec.finetune.cutoff,
                                                   "history": history})
    summary = {"run_dir": str(store.root), "out": str(target), "out_bytes": target.stat().st_size,
               "seconds": round(verb.seconds, 2), "cutoff": rec.finetune.cutoff,
               "tuning": tuning_choice(loaded, rec.finetune), **metrics}
    results = verb.conclude(summary, gates, gate_metrics(metrics["tuned"], metrics["base"]), out=target)
    return summary, results
