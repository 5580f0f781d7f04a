"""``pgraft evaluate``: sample a model (corrected or fine-tuned files composed) and measure it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import PgraftError
from .skeleton import (DataOptions, FeatureOptions, ModelOptions, Outcome, PromptOptions, Verb, corrector_steps,
                       default_run_dir, prompt_list, real_data, references, resolve_recipe, reward_from, start)


@dataclass
class EvaluateOptions(ModelOptions, DataOptions, PromptOptions, FeatureOptions):
    """What ``pgraft evaluate`` takes besides MODEL (None: the recipe's value)."""

    num: Optional[int] = None
    steps: Optional[int] = None
    seed: Optional[int] = None
    base: Optional[str] = None
    tuned_guidance: Optional[str] = None
    reward: Optional[str] = None


def evaluate(model: str, o: EvaluateOptions) -> Optional[Outcome]:
    """FID/KID, NFE, FLOPs and time per image of MODEL (evaluate.json, and the seconds and report);
    the gate results. None on processes other than the main one."""
    from ..io.recipes import SampleConfig
    from ..report.gates import gate_metrics, gate_names, parse_gates
    from ..report.ui import evaluate_view
    from ..stages.evaluate import evaluate_model, pick_features
    from ..stages.sample import Conditions, check_conditions

    gates = parse_gates(o.fail_if, gate_names("evaluate", reward=bool(o.reward)))
    rec = resolve_recipe(o.recipe, o.sets, evaluate__num=o.num, evaluate__seed=o.seed, evaluate__steps=o.steps,
                         evaluate__features=o.features, evaluate__inception_weights=o.inception_weights)
    verb: Verb = start("evaluate", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet, o.base)
    loaded, dev = verb.model, verb.device
    if o.tuned_guidance is not None:  # compare both readings of one fine-tuned file
        if o.tuned_guidance not in ("none", "reapply") or not loaded.finetuned:
            raise PgraftError(f"--tuned-guidance {o.tuned_guidance}: pass none or reapply, for a fine-tuned file "
                              f"(pgraft finetune's output); {model} is {'one' if loaded.finetuned else 'not one'}")
        loaded.tuned_guidance = o.tuned_guidance
    cond = Conditions(prompts=prompt_list(o.prompt, o.prompts) or None)
    check_conditions(loaded, cond)
    rew = reward_from(o.reward, dev) if o.reward else None
    eval_steps = rec.evaluate.steps or rec.sample.steps
    if loaded.corrector is not None:
        eval_steps = corrector_steps(loaded, rec.evaluate.steps, "evaluate")
    real, data_id = real_data(loaded, o.data)  # read batch by batch
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev)
    eval_cfg = SampleConfig(num=rec.evaluate.num, seed=rec.evaluate.seed, steps=eval_steps,
                            batch_size=rec.sample.batch_size, lane=rec.sample.lane)
    eval_cfg.guidance_scale = rec.sample.guidance_scale
    run_dir = o.run_dir or default_run_dir("evaluate", {"model": loaded.identity, "data": data_id, "recipe": rec.to_dict(),
                                                         "steps": eval_steps, "prompts": cond.prompts})
    with verb.run_dir(run_dir) as store:
        fid_data, refs = references(loaded, o.data, o.eval_data, real, data_id, feats, rec.evaluate.kid_subsets)
        dist = verb.dist
        metrics = evaluate_model(loaded, None, eval_cfg, feats, store, verb.bar, "sample", rec.evaluate.kid_subsets,
                                 real_features=refs[fid_data], also_against={k: v for k, v in refs.items() if k != fid_data},
                                 cond=cond, reward=rew, process_index=dist.rank, num_processes=dist.size,
                                 barrier=dist.barrier)
        if not verb.is_main:
            return None
        metrics = {**metrics, "model": loaded.source, "data": data_id, "fid_data": fid_data, "run_dir": str(store.root),
                   "corrected": loaded.corrector is not None, "finetuned": loaded.finetuned,
                   "cutoff": loaded.cutoff, "dtype": str(loaded.dtype).removeprefix("torch.")}
        store.write_json("evaluate.json", metrics)
    summary = {**metrics, "seconds": round(verb.seconds, 2)}
    label = "corrected" if metrics["corrected"] else ("fine-tuned" if metrics["finetuned"] else "model")
    artifacts = {"summary": "evaluate.json", "samples": [[label, "sample"]]}
    results = verb.conclude(summary, gates, gate_metrics(metrics), artifacts)
    return Outcome(summary, evaluate_view(model, summary), results)
