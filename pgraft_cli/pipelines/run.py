"""``pgraft run``: the pipeline a recipe's ``[run] stages`` name, with the recipe's own settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import PgraftError
from .correct import CorrectOptions, correct
from .finetune import FinetuneOptions, finetune
from .sample import SampleOptions, sample
from .skeleton import resolve_recipe

# The stage lists pgraft runs, and the pipeline that runs each (its options: those of the verb).
PIPELINES = {
    ("sample",): ("sample", sample, SampleOptions),
    ("sample", "score", "filter", "finetune"): ("finetune", finetune, FinetuneOptions),
    ("invert", "train_corrector", "evaluate"): ("correct", correct, CorrectOptions),
}


def run(model: str, recipe: str, sets: Optional[list[str]], run_dir: Optional[Path], config: Optional[str],
        kind: Optional[str], allow_pickle: bool, device: Optional[str], quiet: bool) -> tuple[str, Any]:
    """Run the recipe's stages on MODEL; returns the verb whose pipeline ran and what it returned."""
    rec = resolve_recipe(recipe, sets)
    found = PIPELINES.get(tuple(rec.run.stages))
    if found is None:
        lists = [json.dumps(list(stages)) for stages in PIPELINES]
        raise PgraftError(f"recipe '{rec.name}' lists stages {rec.run.stages}; pgraft runs "
                          f"{', '.join(lists[:-1])} or {lists[-1]}")
    verb, pipeline, options = found
    return verb, pipeline(model, options(recipe=recipe, sets=sets, run_dir=run_dir, config=config, kind=kind,
                                         allow_pickle=allow_pickle, device=device, quiet=quiet))
