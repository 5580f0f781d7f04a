"""``pgraft sample``: the sample stage into a run directory, then the PNGs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import __version__
from .skeleton import (DrawOptions, ModelOptions, Outcome, PromptOptions, Verb, corrector_steps, default_run_dir,
                       precision_note, prompt_list, resolve_recipe, sampler_guidance, start)


@dataclass
class SampleOptions(ModelOptions, PromptOptions, DrawOptions):
    """What ``pgraft sample`` takes besides MODEL (None: the recipe's value)."""

    batch_size: Optional[int] = None
    out: Optional[Path] = None
    class_label: Optional[int] = None
    capture_at: Optional[float] = None
    guidance_scale: Optional[float] = None
    force: bool = False


def sample(model: str, o: SampleOptions) -> Optional[Outcome]:
    """Sample MODEL into a (resumable) run and export the PNGs; the summary (None on other processes)."""
    from ..report.ui import note, sample_view
    from ..stages.sample import (Conditions, check_conditions, check_png_reuse, compile_note, export_pngs, run_sample,
                                 stage_config)

    rec = resolve_recipe(o.recipe, o.sets, sample__num=o.num, sample__seed=o.seed, sample__steps=o.steps,
                         sample__batch_size=o.batch_size, sample__capture_at=o.capture_at,
                         sample__guidance_scale=o.guidance_scale)
    cond = Conditions(prompts=prompt_list(o.prompt, o.prompts) or None, class_label=o.class_label)
    verb: Verb = start("sample", rec, model, o.config, o.kind, o.allow_pickle, o.device, o.quiet, o.base)
    loaded = verb.model
    if loaded.corrector is not None:  # one corrector per base step count
        rec.sample.steps = corrector_steps(loaded, o.steps, "sample", sampler_guidance(loaded, rec.sample))
        mismatch = precision_note(loaded)
        if mismatch:
            note(f"note: {mismatch}", o.quiet)
    check_conditions(loaded, cond)
    slower = compile_note(loaded, rec.sample)
    if slower:
        note(f"note: {slower}", o.quiet)
    # the recipe keeps "auto" (also in the default run directory: free memory must not move it); the
    # lane used goes in the settings, and a resume reuses it
    run_dir = o.run_dir or default_run_dir("sample", {"model": loaded.identity, **stage_config(loaded, rec.sample, cond)})
    if o.out is not None and not o.force:  # before any sampling: another sampling's images are not replaced silently
        check_png_reuse(o.out, {"model_identity": loaded.identity, **stage_config(loaded, rec.sample, cond)})
    with verb.run_dir(run_dir) as store:
        dist = verb.dist
        result = run_sample(loaded, rec.sample, cond, store, verb.bar, dist.rank, dist.size, barrier=dist.barrier)
        if not verb.is_main:
            return None
        target = o.out or store.root / "images"
        store.record_artifacts("sample", {"samples": [["samples", "sample"]], "settings": "sample/settings.json"})
        written = export_pngs(store.root, target, {**result.settings, "prompts": cond.prompts, "model": loaded.source,
                                                   "model_identity": loaded.identity, "pgraft_version": __version__})
    summary = {
        "run_dir": str(store.root), "out": str(target), "num": written, "generated_now": result.generated,
        "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 2),
        "steps": rec.sample.steps, "seed": rec.sample.seed, "lane": result.settings["lane"],
        "processes": dist.size, "device": verb.device,
    }
    return Outcome(summary, sample_view(summary))
