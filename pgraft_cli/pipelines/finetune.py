"""GRAFT / P-GRAFT verbs: ``pgraft score`` and ``pgraft filter`` on a run, and ``pgraft finetune``'s rounds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import PgraftError, StoppedError
from .skeleton import (DataOptions, ModelOptions, Options, Outcome, PromptOptions, Verb, check_out_spares_inputs,
                       check_tracker, default_run_dir, open_run, prompt_list, real_data, references, resolve_recipe,
                       reward_from, start, trackers)


@dataclass
class ScoreOptions(Options):
    """What ``pgraft score`` takes besides RUN_DIR."""

    reward: Optional[str] = None
    stage: str = "sample"


def derived_stage(stage: str, kind: str) -> str:
    """The ``kind`` (score, filter) stage of the sample stage ``stage``: ``score`` of ``sample``, ``score-r2`` of
    ``sample-r2`` (the rounds' names), ``score-evaluate-tuned`` of ``evaluate-tuned`` (never ``stage`` itself,
    which the run store would clear as a stage of another key)."""
    return kind + stage.removeprefix("sample") if stage.startswith("sample") else f"{kind}-{stage}"


def score(run_dir: Path, o: ScoreOptions) -> Outcome:
    """Score the images of a run's sample ``stage`` (into ``derived_stage``: ``score`` for ``sample``, ``score-r2``
    for ``sample-r2``, ``score-evaluate-tuned`` for ``evaluate-tuned`` ...)."""
    from ..report.ui import progress, score_view
    from ..stages.score import reward_stats, run_score

    rec = resolve_recipe(o.recipe, o.sets, score__reward=o.reward)
    rew = reward_from(rec.score.reward, batch_size=rec.score.batch_size)
    score_stage = derived_stage(o.stage, "score")
    with open_run(run_dir) as store, progress(not o.quiet) as bar:
        rewards = run_score(store, rew, bar, o.stage, score_stage)
    summary = {"run_dir": str(run_dir), "reward": rew.spec, "stage": score_stage, **reward_stats(rewards)}
    return Outcome(summary, score_view(summary))


@dataclass
class FilterOptions(Options):
    """What ``pgraft filter`` takes besides RUN_DIR (None: the recipe's value)."""

    stage: str = "sample"
    rule: Optional[str] = None
    k: Optional[int] = None
    m: Optional[int] = None
    threshold: Optional[float] = None
    quantile: Optional[float] = None
    dedup: Optional[bool] = None


def filter_(run_dir: Path, o: FilterOptions) -> Outcome:
    """Keep a run's scored samples by the recipe's rule (the options override its keys)."""
    from ..report.ui import filter_report
    from ..stages.filter import run_filter

    rec = resolve_recipe(o.recipe, o.sets, filter__rule=o.rule, filter__k=o.k, filter__m=o.m,
                         filter__threshold=o.threshold, filter__quantile=o.quantile, filter__dedup=o.dedup)
    names = {s: derived_stage(o.stage, s) for s in ("score", "filter")}
    with open_run(run_dir, "filter") as store:
        summary = run_filter(store, rec.filter, o.stage, names["score"], names["filter"])
    shown = {k: v for k, v in summary.items() if k not in ("kept_indices", "cdf", "reshaped_reward")}
    return Outcome({"run_dir": str(run_dir), **shown}, [filter_report(summary)])


@dataclass
class FinetuneOptions(ModelOptions, DataOptions, PromptOptions):
    """What ``pgraft finetune`` takes besides MODEL (None: the recipe's value)."""

    reward: Optional[str] = None
    cutoff: Optional[float] = None
    out: Optional[Path] = None
    rounds: Optional[int] = None
    lora_rank: Optional[int] = None
    class_label: Optional[int] = None
    judge: Optional[list[str]] = None  # [NAME=]REWARD, measured each round, never optimised
    stop_if: Optional[list[str]] = None
    log_with: Optional[str] = None
    recipe: str = "pgraft"


def finetune(model: str, o: FinetuneOptions) -> Optional[Outcome]:
    """Rounds of sample -> score -> filter -> fine-tune, base vs tuned, the tuned file and the report.

    None on processes other than the main one.
    """
    from ..io.checkpoints import base_info_of, save_finetuned
    from ..report.gates import check_final_stop, check_stop, gate_metrics, gate_names, judge_names, parse_gates, parse_stop
    from ..report.ui import finetune_report, wrote_lines
    from ..stages.evaluate import best_of_measured, fid_skipped, pick_features, sample_metrics
    from ..stages.finetune import check_batch_split, evaluate_pair, resolve_lora, round_stage, run_rounds, tuning_choice
    from ..stages.sample import Conditions, check_conditions

    judge_specs = judge_names(o.judge)
    for text in o.stop_if or []:
        parse_stop(text)  # the syntax, before anything loads
    check_tracker(o.log_with)
    rec = resolve_recipe(o.recipe, o.sets, score__reward=o.reward, finetune__cutoff=o.cutoff,
                         finetune__rounds=o.rounds, finetune__lora_rank=o.lora_rank,
                         evaluate__features=o.features, evaluate__inception_weights=o.inception_weights)
    prompts = prompt_list(o.prompt, o.prompts) or None
    grouped = best_of_measured(len(prompts or []), rec.evaluate.num, None)  # the evaluations' best-of over prompts
    gates = parse_gates(o.fail_if, gate_names("finetune", judges=[n for n, _ in judge_specs], grouped=grouped))
    cond = Conditions(prompts=prompts, class_label=o.class_label)
    check_out_spares_inputs(o.out, {"MODEL": model, "--config": o.config, "--data": o.data, "--eval-data": o.eval_data})
    verb: Verb = start("finetune", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet)
    loaded, dev = verb.model, verb.device
    check_batch_split(rec.finetune.batch_size, verb.dist.size)  # before round 1's sampling, not after it
    if loaded.corrector is not None or loaded.finetuned:
        raise PgraftError(f"{model} is a corrected or fine-tuned file; pass its base model to fine-tune")
    check_conditions(loaded, cond)
    rec = replace(rec, finetune=resolve_lora(loaded, rec.finetune))  # the run dir's recipe.toml keeps "auto"
    rew = reward_from(rec.score.reward, dev, rec.score.batch_size)
    judges = {name: reward_from(spec, dev, rec.score.batch_size) for name, spec in judge_specs}  # never optimised
    terms = {t.split("*", 1)[-1] for t in rew.identity.split("+")} | {rew.identity}
    for (name, spec), judge in zip(judge_specs, judges.values()):
        if judge.identity in terms:
            raise PgraftError(f"--judge {spec} is the training reward {rec.score.reward} (or a term of it): a judge is "
                              f"never optimised, or it only repeats the reward; pass another one (e.g. classifier:judge:3)")
    base_info = base_info_of(loaded)
    real, data_id = (None, None)
    if o.data or loaded.default_data:
        real, data_id = real_data(loaded, o.data)  # streamed: only the FID reference reads it
    # The default run directory depends only on what sampling depends on, so that a new reward,
    # rule or training setting re-runs scoring onwards in the same run, never sampling.
    run_dir = o.run_dir or default_run_dir("finetune", sampling_payload(loaded.identity, rec, cond))
    # Features without data still measure diversity (an explicit --features clip:PATH on a text model).
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev,
                          reward_identity=rew.identity) if data_id is not None or rec.evaluate.features != "auto" else None
    has_fid = feats is not None and data_id is not None
    notes = [] if has_fid else [fid_skipped(rec.evaluate.features, data_id is not None)]
    per_round = {"reward", *(f"judge.{n}" for n in judges), *(["pairwise_distance"] if feats is not None else []),
                 *(["fid", "kid", "precision", "recall"] if has_fid else [])}
    stops = [parse_stop(text, per_round) for text in o.stop_if or []]
    with verb.run_dir(run_dir) as store:
        fid_data, refs = None, {}
        if has_fid:
            fid_data, refs = references(loaded, o.data, o.eval_data, real, data_id, feats, rec.evaluate.kid_subsets, store.root)
        measure = None if feats is None else (lambda images, groups: sample_metrics(feats, images, groups, refs.get(fid_data)))
        dist = verb.dist
        with trackers(o.log_with, store.root, rec.to_dict()) as log:
            history = run_rounds(loaded, rec, rew, cond, store, verb.bar, dist.rank, dist.size, dist.barrier,
                                 measure=measure, judges=judges, log=log,
                                 stop=(lambda rounds: check_stop(stops, rounds)) if stops else None)
            if not verb.is_main:
                return None
            metrics = evaluate_pair(loaded, rec, rew, cond, feats, store, verb.bar, refs, fid_data, notes, judges)
            reason = check_final_stop(stops, metrics["base"], metrics["tuned"]) if stops else None
            if reason:  # the rounds measure the model entering each round, never the final one
                raise StoppedError(f"the final model failed --stop-if: {reason} on the evaluation seeds; no checkpoint "
                                   f"was written (lower finetune.learning_rate, fewer rounds, or loosen --stop-if)")
            if log is not None:  # base and tuned on the evaluation's seeds, after the last round's steps
                log({f"eval/{name}/{k}": v for name in ("base", "tuned") for k, v in gate_metrics(metrics[name]).items()
                     if isinstance(v, (int, float))}, step=len(history) * rec.finetune.steps)
        metrics["rounds"] = [{k: v for k, v in h.items() if k not in ("filter", "loss_curve")} for h in history]
        if history[-1].get("stopped"):  # the model is back to the last one that passed
            r = history[-1]["round"]
            metrics["stopped"] = {"round": r, "reason": history[-1]["stopped"], "rounds_kept": r - 2}
        metrics["reward"], metrics["data"], metrics["fid_data"] = rew.spec, data_id, fid_data
        metrics["reward_identity"] = rew.identity  # the file's: `pgraft evaluate` keeps FID off its features
        target = o.out or store.root / "tuned.safetensors"
        save_finetuned(target, loaded, base_info, rec.finetune, metrics, rec.to_dict())
        store.write_json("finetune/summary.json", {**metrics, "out": str(target), "cutoff": rec.finetune.cutoff,
                                                   "judges": dict(judge_specs), "history": history})
        store.write_json("finetune/timeline.json", timeline(loaded, rec.evaluate.steps or rec.sample.steps,
                                                            rec.finetune.cutoff))
        summary = {"run_dir": str(store.root), "out": str(target), "out_bytes": target.stat().st_size,
                   "seconds": round(verb.seconds, 2), "cutoff": rec.finetune.cutoff, "judges": dict(judge_specs),
                   "tuning": tuning_choice(loaded, rec.finetune), **metrics}
        artifacts = {"summary": "finetune/summary.json", "timeline": "finetune/timeline.json",
                     "rounds": [f"{round_stage('finetune', h['round'])}/result.json" for h in history if "finetune" in h],
                     "samples": [["base", "evaluate-base"], ["tuned", "evaluate-tuned"]]}
        results = verb.conclude(summary, gates, gate_metrics(metrics["tuned"], metrics["base"]), artifacts, out=target)
    return Outcome(summary, [finetune_report(summary), f"trained: {summary['tuning']}", *wrote_lines(summary)], results)


def sampling_payload(identity: str, rec: Any, cond: Any) -> dict[str, Any]:
    """What a fine-tune's sampling depends on, which names its default run directory: the model, the sample
    section, the cutoff, the prompts and a ``--class`` (left out when not given, so such runs keep the names
    earlier versions gave them)."""
    payload = {"model": identity, "sample": rec.to_dict()["sample"], "cutoff": rec.finetune.cutoff,
               "prompts": cond.prompts}
    return payload if cond.class_label is None else {**payload, "class": cond.class_label}


def timeline(loaded: Any, steps: int, cutoff: float) -> dict[str, Any]:
    """The sampler's time grid and which of its steps the fine-tuned model takes (the report's cutoff plot)."""
    from ..core.samplers import above_cutoff

    grid = loaded.schedule.grid(steps).double()
    return {"grid": grid.tolist(), "tuned": above_cutoff(grid, cutoff).tolist(), "steps": steps, "cutoff": cutoff,
            "name": "flow-euler" if loaded.family == "flow" else "ddim-trailing"}
