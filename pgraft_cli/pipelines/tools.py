"""The verbs that run no stage: ``inspect``, ``status``, ``report`` and ``recipes ls|show|cp``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import OutputPathError, PgraftError
from .skeleton import Outcome, load


def inspect(model: str, config: Optional[str], kind: Optional[str], allow_pickle: bool) -> Outcome:
    """What MODEL is: family and prediction type, conditioning, shapes, size, scheduler, provenance."""
    from ..io.checkpoints import describe
    from ..io.recipes import load_recipe
    from ..report.ui import inspect_table

    info = describe(load(model, config, kind, allow_pickle, load_recipe("default")))
    return Outcome(info, [inspect_table(model, info)], indent=2)


def status(run_dir: Path) -> Outcome:
    """Each stage of a run directory as done, partial, pending or stale."""
    from ..io.runstore import MANIFEST, RunStore
    from ..report.ui import status_table

    if not (run_dir / MANIFEST).is_file():
        raise PgraftError(f"{run_dir} is not a pgraft run directory (no {MANIFEST}); pass the --run-dir of a run")
    stages = RunStore(run_dir, is_main=False).status()
    return Outcome({"run_dir": str(run_dir), "stages": [s.__dict__ for s in stages]}, [status_table(run_dir, stages)])


def report(run_dir: Path, open_: bool) -> Outcome:
    """Render RUN_DIR/report.html again, and open it in a browser if asked."""
    from ..report.html import render_report

    path = render_report(run_dir)
    if open_:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            raise PgraftError(f"no web browser could be started; open {path} yourself")
    return Outcome({"run_dir": str(run_dir), "report": str(path)}, [f"[green]wrote[/green] {path}"])


def recipes_ls() -> Outcome:
    from ..io.recipes import available_recipes, load_recipe
    from ..report.ui import recipes_table

    found = {name: load_recipe(name).description for name in available_recipes()}
    return Outcome(found, [recipes_table(found)])


def recipe_text(name: str) -> str:
    """The text of a recipe (a bundled name, or a .toml path), as it is."""
    from ..io.recipes import find_recipe

    return find_recipe(name).read_text()


def recipes_cp(name: str, dest: Path) -> Path:
    """Copy a bundled recipe to ``dest`` (a .toml file, or a folder for NAME.toml); never overwrites."""
    from ..io.host import check_writable
    from ..io.recipes import find_recipe
    from ..io.runstore import atomic_write_text

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise OutputPathError(f"{target} exists; pass a new file name (pgraft never overwrites a recipe)")
    if target.suffix != ".toml":
        raise OutputPathError(f"{target} does not end in .toml; pass e.g. {target.with_suffix('.toml')}")
    check_writable(target, "DEST", is_file=True)
    atomic_write_text(target, source.read_text())
    return target
