"""``pgraft evaluate``: sample a model (corrected or fine-tuned files composed) and measure it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PgraftError
from .skeleton import (DataOptions, DrawOptions, FeatureOptions, ModelOptions, Options, Outcome, PromptOptions, Verb,
                       computed_recipe, corrector_steps, default_run_dir, precision_note, prompt_list, real_data, references,
                       resolve_recipe, reward_from, sampler_guidance, start, tuned_steps)


@dataclass
class EvaluateOptions(ModelOptions, DataOptions, PromptOptions, DrawOptions):
    """What ``pgraft evaluate`` takes besides MODEL (None: the recipe's value)."""

    tuned_guidance: Optional[str] = None
    reward: Optional[str] = None
    best_of: Optional[int] = None


def best_of_num(best_of: Optional[int], num: Optional[int], prompts: Optional[list[str]], default: int) -> int:
    """How many images to sample: ``best_of`` per prompt (``P x N``, the paper's protocol), else ``--num``."""
    if best_of is None:
        return num or default
    if best_of < 1:
        raise PgraftError(f"--best-of {best_of}: pass a number of samples per prompt >= 1")
    want = best_of * len(prompts) if prompts else (num or default)
    if num is not None and num != want:
        raise PgraftError(f"--num {num} disagrees with --best-of {best_of} for {len(prompts or [])} prompts "
                          f"({want} images); drop --num")
    if not prompts and want % best_of:
        raise PgraftError(f"--best-of {best_of} must divide the number of samples ({want}); pass --num as a multiple")
    return want


def evaluate(model: str, o: EvaluateOptions) -> Optional[Outcome]:
    """FID/KID, NFE, FLOPs and time per image of MODEL (evaluate.json, and the seconds and report);
    the gate results. None on processes other than the main one."""
    from ..io.recipes import SampleConfig
    from ..report.gates import gate_metrics, gate_names, parse_gates
    from ..report.ui import evaluate_view, note
    from ..stages.evaluate import (JUDGE_FEATURES, best_of_measured, check_best_of_groups, evaluate_model, fid_skipped,
                                   pick_features, tuned_reward_identity)
    from ..stages.sample import Conditions, check_conditions

    rec = resolve_recipe(o.recipe, o.sets, evaluate__num=o.num, evaluate__seed=o.seed, evaluate__steps=o.steps,
                         evaluate__features=o.features, evaluate__inception_weights=o.inception_weights)
    prompts = prompt_list(o.prompt, o.prompts) or None
    grouped = best_of_measured(len(prompts or []), o.num or rec.evaluate.num, o.best_of)
    gates = parse_gates(o.fail_if, gate_names("evaluate", reward=bool(o.reward), grouped=grouped))
    verb: Verb = start("evaluate", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet, o.base)
    loaded, dev = verb.model, verb.device
    if o.tuned_guidance is not None:  # compare both readings of one fine-tuned file
        if o.tuned_guidance not in ("none", "reapply"):
            raise PgraftError(f"--tuned-guidance {o.tuned_guidance!r} is unknown; pass none or reapply")
        if not loaded.finetuned:
            raise PgraftError(f"--tuned-guidance applies to a fine-tuned file (pgraft finetune's output); {model} is "
                              f"not one: drop --tuned-guidance")
        loaded.tuned_guidance = o.tuned_guidance
    cond = Conditions(prompts=prompts)
    check_conditions(loaded, cond)
    rew = reward_from(o.reward, dev) if o.reward else None
    eval_steps = rec.evaluate.steps or rec.sample.steps
    own = tuned_steps(loaded) if rec.evaluate.steps is None and loaded.corrector is None else None
    steps_note = None
    if own is not None and own != eval_steps:  # its numbers (FID, reward) are of that count: compare like with like
        steps_note = f"{model} was tuned and evaluated at {own} steps; evaluated at {own} (--steps N for another count)"
        note(f"note: {steps_note}", o.quiet)
        eval_steps = own
    if loaded.corrector is not None:
        eval_steps = corrector_steps(loaded, rec.evaluate.steps, "evaluate", sampler_guidance(loaded, rec.sample))
    num = best_of_num(o.best_of, o.num, cond.prompts, rec.evaluate.num)
    check_best_of_groups(loaded, cond, num, o.best_of)
    has_data = bool(o.data or loaded.default_data)
    real, data_id = real_data(loaded, o.data) if has_data else (None, None)  # read batch by batch
    # FID off the features of a reward being judged or tuned on (pick_features: its blind spots are the model's)
    optimised = " ".join(i for i in (rew.identity if rew else "", tuned_reward_identity(loaded)) if i)
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev,
                          reward_identity=optimised)
    notes = [] if has_data and feats is not None else [fid_skipped(rec.evaluate.features, has_data)]
    mismatch = [n for n in [precision_note(loaded), steps_note] if n]  # said in the results; `notes` alone says FID is skipped
    if (optimised and not notes and rec.evaluate.features == "auto" and feats is not None
            and feats.name.startswith(JUDGE_FEATURES)):  # (notes: FID skipped)
        mismatch.append("FID in the bundled judge's features: the reward (--reward, or the one this file was tuned on) "
                        "is the classifier --features auto takes otherwise; a stats file for --data needs --features judge")
    eval_cfg = SampleConfig(num=num, seed=rec.evaluate.seed, steps=eval_steps,
                            batch_size=rec.sample.batch_size, lane=rec.sample.lane, memory_format=rec.sample.memory_format)
    eval_cfg.guidance_scale, eval_cfg.distilled_guidance = rec.sample.guidance_scale, rec.sample.distilled_guidance
    run_dir = o.run_dir or default_run_dir("evaluate", {"model": loaded.identity, "data": data_id,
                                                         "recipe": computed_recipe(rec.to_dict()), "steps": eval_steps,
                                                         "prompts": cond.prompts})
    if not notes and num < 2:  # before the reference features are computed, not after sampling
        raise PgraftError(f"FID and KID need at least 2 generated images, got evaluate.num = {num}; raise it (--num)")
    with verb.run_dir(run_dir) as store:
        fid_data, refs = (references(loaded, o.data, o.eval_data, real, data_id, feats, rec.evaluate.kid_subsets,
                                                 store.root)
                          if not notes else (None, {}))
        dist = verb.dist
        metrics = evaluate_model(loaded, None, eval_cfg, feats, store, verb.bar, "sample", rec.evaluate.kid_subsets,
                                 real_features=refs.get(fid_data), also_against={k: v for k, v in refs.items() if k != fid_data},
                                 cond=cond, reward=rew, best_of=o.best_of, notes=notes + mismatch, process_index=dist.rank,
                                 num_processes=dist.size, barrier=dist.barrier)
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


def parse_shape(text: Optional[str], data: str) -> tuple[int, int, int]:
    """``--shape CxHxW``; the bundled digits default to 1x16x16."""
    from ..io.data import ALIASES

    if text is None:
        if data in ALIASES:
            return (1, 16, 16)
        raise PgraftError("pgraft stats needs the images' shape: pass --shape CxHxW (the model's, e.g. 3x512x512)")
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) not in (1, 3):
        raise PgraftError(f"--shape {text!r}: write CxHxW with C 1 or 3, e.g. 3x512x512")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


@dataclass
class StatsOptions(Options, FeatureOptions):
    """What ``pgraft stats`` takes besides DATA."""

    out: Optional[Path] = None
    shape: Optional[str] = None
    device: Optional[str] = None


def stats(data: str, o: StatsOptions) -> Outcome:
    """``pgraft stats``: DATA's feature statistics in ``o.out`` (``io.refstats``), for ``--data out``."""
    from ..io.recipes import check_feature_choice
    from ..io.refstats import STATS_VERSION, data_identity, is_stats_file, save_stats
    from ..stages.evaluate import cached_reference, pick_features

    features, out = o.features or "auto", o.out
    if is_stats_file(data):
        raise PgraftError(f"{data} is already a stats file; pass the images it was computed from")
    check_feature_choice(features)
    image_shape = parse_shape(o.shape, data)
    if out is None or out.suffix != ".npz":
        raise PgraftError(f"--out {out}: a stats file ends in .npz; pass e.g. --out ref.npz")
    rec = resolve_recipe(o.recipe, o.sets)
    feats = pick_features(features, image_shape, o.inception_weights, o.device or "cpu")
    if feats is None:
        raise PgraftError(f"--features {features}: no feature extractor at hand; pass --features inception "
                          f"--inception-weights PATH, classifier, judge, clip:PATH or dinov2:PATH")
    metric = cached_reference(feats, data, image_shape, rec.evaluate.kid_subsets)  # the user cache: a second call is free
    meta = {"features": feats.identity, "image_shape": list(image_shape), "data": data_identity(data),
            "version": STATS_VERSION}
    state = metric.reference_state()
    save_stats(out, state, meta)
    summary = {**meta, "out": str(out), "num": int(state["n"]), "dim": int(state["mu"].shape[0]),
               "features": feats.name, "identity": feats.identity}
    return Outcome(summary, [f"[green]wrote[/green] {out}: {summary['num']} images, {summary['dim']}-d {feats.name} features"])
