"""``pgraft run``: the pipeline a recipe's ``[run] stages`` name, with the recipe's own settings."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from ..errors import PgraftError
from .correct import CorrectOptions, correct
from .finetune import FinetuneOptions, finetune
from .sample import SampleOptions, sample
from .skeleton import ModelOptions, Outcome, resolve_recipe

# The stage lists pgraft runs, and the pipeline that runs each (its options: those of the verb).
PIPELINES = {
    ("sample",): (sample, SampleOptions),
    ("sample", "score", "filter", "finetune"): (finetune, FinetuneOptions),
    ("invert", "train_corrector", "evaluate"): (correct, CorrectOptions),
}


def run(model: str, o: ModelOptions) -> Optional[Outcome]:
    """Run the recipe's stages on MODEL; what the pipeline that ran returned."""
    rec = resolve_recipe(o.recipe, o.sets)
    found = PIPELINES.get(tuple(rec.run.stages))
    if found is None:
        lists = [json.dumps(list(stages)) for stages in PIPELINES]
        raise PgraftError(f"recipe '{rec.name}' lists stages {rec.run.stages}; pgraft runs "
                          f"{', '.join(lists[:-1])} or {lists[-1]}")
    pipeline, options = found
    return pipeline(model, options(**{f.name: getattr(o, f.name) for f in dataclasses.fields(ModelOptions)}))
