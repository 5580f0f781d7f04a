"""``pgraft correct``: invert -> train_corrector -> evaluate base vs corrected, then the corrected file."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import PgraftError
from .skeleton import (DataOptions, ModelOptions, Outcome, Verb, check_out_spares_inputs, computed_recipe,
                       default_run_dir, real_data, recorded_bases, references, resolve_recipe, sampler_guidance,
                       start)


@dataclass
class CorrectOptions(ModelOptions, DataOptions):
    """What ``pgraft correct`` takes besides MODEL (None: the recipe's value)."""

    captions: Optional[str] = None
    out: Optional[Path] = None
    steps: Optional[int] = None
    recipe: str = "inverse-noise"


def copy_skipped(conditioning: str, fid_data: str, data_id: str) -> Optional[str]:
    """Why the data-copying test cannot run on this run's references (None: it can). It needs held-out
    images: FID's reference other than ``--data`` (a stats file of the same data counts as the same), and
    samples drawn like them: a conditioned model's evaluation follows ``--data``'s captions, or every
    class in turn, not the held-out images' own."""
    from ..io.refstats import data_identity, is_stats_file, stats_meta

    if conditioning != "none":
        what = "captions" if conditioning == "text" else "classes in turn"
        return (f"copy test skipped: a {conditioning}-conditioned model is sampled on --data's {what}, not the held-out "
                f"images' own, which biases the comparison (the test runs on unconditional models)")
    if fid_data == data_id or (is_stats_file(fid_data) and stats_meta(fid_data).get("data") == data_identity(data_id)):
        return (f"copy test skipped: FID's reference is the training data ({data_id}); pass --eval-data with held-out "
                f"images to test whether the samples copy it")
    return None


def correct(model: str, o: CorrectOptions) -> Optional[Outcome]:
    """Inverse noise correction of MODEL: the summary, its terminal view and the gate results (None on
    the other processes of a multi-process run)."""
    from ..io.checkpoints import save_corrected
    from ..io.recipes import SampleConfig
    from ..report.gates import gate_metrics, gate_names, parse_gates
    from ..report.ui import correct_report, wrote_lines
    from ..stages.correct import check_correctable, corrector_conditions, run_invert, run_train_corrector
    from ..stages.evaluate import COPY_KEYS, copy_reference, evaluate_model, fid_skipped, pick_features
    from ..stages.finetune import main_first
    from ..stages.sample import Conditions, resolve_lane, run_sample

    gates = parse_gates(o.fail_if, gate_names("correct"))
    rec = resolve_recipe(o.recipe, o.sets, correct__base_steps=o.steps, evaluate__features=o.features,
                         evaluate__inception_weights=o.inception_weights)
    copy_gates = [g.text for g in gates if g.name.removeprefix("base.") in COPY_KEYS]
    if copy_gates and not rec.evaluate.copy_test:
        raise PgraftError(f"--fail-if {copy_gates[0]} gates on the copy test, which evaluate.copy_test = false turns "
                          f"off; drop the gate or the setting")
    check_out_spares_inputs(o.out, {"MODEL": model, "--config": o.config, "--data": o.data, "--eval-data": o.eval_data,
                                    **recorded_bases(model)})
    verb: Verb = start("correct", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet)
    loaded, dev = verb.model, verb.device
    if loaded.corrector is not None:
        raise PgraftError(f"{model} is already a corrected model; pass its base model to correct it again")
    check_correctable(loaded, rec.correct, check_data=False)
    # the inversion reads the rows of its undone shards; a row carries its label or caption
    rows, data_id = real_data(loaded, o.data, rows=True, captions=o.captions)
    rows = rows.head(rec.correct.num_images)
    check_correctable(loaded, rec.correct, rows.labels, rows.captions)
    run_dir = o.run_dir or default_run_dir("correct", {"model": loaded.identity, "data": data_id, "recipe": computed_recipe(rec.to_dict())})
    feats = pick_features(rec.evaluate.features, loaded.image_shape, rec.evaluate.inception_weights or None, dev)
    with verb.run_dir(run_dir) as store:
        bar = verb.bar
        dist = verb.dist  # several processes: each inverts and samples its shards; the corrector trains once
        shard = rec.correct.invert_shard_size  # inversion chunks a shard by the lane and pads nothing
        lane = resolve_lane(loaded, replace(rec.sample, num=shard, batch_size=shard), dist.size).lane
        with verb.timed("inversion"):
            noises, inv, keep = run_invert(loaded, rows, rec.correct, lane, store, bar, dist, rec.sample.guidance_scale,
                                           auto_lane=rec.sample.lane == "auto", memory_format=rec.sample.memory_format,
                                           distilled_guidance=rec.sample.distilled_guidance)
        conds = corrector_conditions(loaded, rows.labels[keep] if loaded.conditioning == "class" else None,
                                     [c for c, k in zip(rows.captions, keep) if k] if loaded.conditioning == "text" else None,
                                     lane)
        with verb.timed("corrector_training"):
            corrector, info = main_first(store, dist.barrier, lambda: run_train_corrector(
                noises, loaded.sample_shape, rec.correct, loaded.identity, store, bar, device=dev, conds=conds))
        # the sampler it was fitted to: the guidance a conditioned base was inverted with, and the autocast
        if loaded.conditioning != "none":
            corrector.guidance_scale = sampler_guidance(loaded, rec.sample)
        corrector.autocast = None if loaded.autocast is None else str(loaded.autocast)
        corrector.dtype = str(loaded.dtype)
        info["fitted_precision"] = loaded.precision
        split = {"process_index": dist.rank, "num_processes": dist.size, "barrier": dist.barrier}
        eval_cfg = SampleConfig(num=rec.evaluate.num, seed=rec.evaluate.seed, steps=rec.correct.base_steps,
                                batch_size=rec.sample.batch_size, lane=rec.sample.lane,
                                guidance_scale=rec.sample.guidance_scale, distilled_guidance=rec.sample.distilled_guidance,
                                memory_format=rec.sample.memory_format)
        # text models are evaluated on the data's captions (image i: caption i mod P); class models by i mod C
        prompts = Conditions(prompts=list(dict.fromkeys(rows.captions))) if loaded.conditioning == "text" else None
        fid_data, refs, notes, copy_ref = None, {}, [fid_skipped(rec.evaluate.features, True)], None
        if feats is not None:
            with verb.timed("evaluation"):
                real, _ = real_data(loaded, o.data)  # streamed into the reference features
                fid_data, refs = references(loaded, o.data, o.eval_data, real, data_id, feats,
                                            rec.evaluate.kid_subsets, store.root)
                # the data-copying test: the samples' nearest training images against the held-out images'
                why = (copy_skipped(loaded.conditioning, fid_data, data_id) if rec.evaluate.copy_test
                       else "copy test off (evaluate.copy_test = false)")
                if why is None and verb.is_main:
                    copy_ref, why = copy_reference(refs[fid_data], refs[data_id], data_id, eval_cfg.num)
            notes = [why] if why else []
        common = dict(real_features=refs.get(fid_data), also_against={k: v for k, v in refs.items() if k != fid_data},
                      notes=notes, cond=prompts, copy_reference=copy_ref)

        def measured(stage_name: str) -> dict[str, Any]:
            with verb.timed("sampling"):  # then evaluate_model finds the samples done
                run_sample(loaded, eval_cfg, prompts or Conditions(), store, bar, stage_name=stage_name, **split)
            with verb.timed("evaluation"):
                result = evaluate_model(loaded, None, eval_cfg, feats, store, bar, stage_name,
                                        rec.evaluate.kid_subsets, **common, **split)
            return {**dict.fromkeys(COPY_KEYS), **result}  # None: the copy test did not run

        base_metrics = measured("evaluate-base")
        loaded.corrector = corrector.to(dev)
        corr_metrics = measured("evaluate-corrected")
        loaded.corrector = None
        if not verb.is_main:
            return None
        metrics = {"base": base_metrics, "corrected": corr_metrics, "inversion": inv,
                   "corrector": {k: v for k, v in info.items() if k != "loss_curve"}, "data": data_id,
                   "fid_data": fid_data}
        target = o.out or store.root / "corrected.safetensors"
        save_corrected(target, corrector, loaded, metrics, rec.to_dict(), {"run_dir": str(store.root), "device": dev})
        store.write_json("correct/summary.json", {**metrics, "out": str(target), "loss_curve": info.get("loss_curve"),
                                                  "corrector_steps": corrector.steps})
        summary = {"run_dir": str(store.root), "out": str(target), "out_bytes": target.stat().st_size,
                   "seconds": round(verb.seconds, 2), "corrector_steps": corrector.steps,
                   "stage_seconds": verb.stage_seconds, "device_name": verb.device_name, **metrics}
        steps = rec.correct.base_steps
        artifacts = {"summary": "correct/summary.json", "inversion": "invert",
                     "samples": [[f"base ({steps} steps)", "evaluate-base"], ["corrected", "evaluate-corrected"]]}
        with verb.timed("report"):
            results = verb.conclude(summary, gates, gate_metrics(corr_metrics, base_metrics, inv), artifacts, out=target)
    labels = {"source": loaded.source, "base_steps": rec.correct.base_steps, "inversion_tol": rec.correct.inversion_tol,
              "inversion_tol_last": rec.correct.inversion_tol_last}
    return Outcome(summary, [*correct_report(summary, labels), *wrote_lines(summary)], results)
