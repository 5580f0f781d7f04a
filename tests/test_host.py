"""The host process: the cyclic garbage collector held while a model's libraries import, spared at exit."""

import gc
import subprocess
import sys

import pytest

from pgraft_cli.errors import PgraftError
from pgraft_cli.io.host import gc_paused


def test_gc_paused_holds_the_collector_and_restores_its_state_even_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()  # a caller that switched it off keeps it off
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_in_a_one_command_process_the_paused_block_is_frozen(monkeypatch):
    import pgraft_cli.io.host as host

    before = gc.get_freeze_count()
    with gc_paused():
        kept = [[i] for i in range(1000)]
    assert gc.get_freeze_count() == before  # a process that goes on: nothing frozen
    monkeypatch.setattr(host, "_ONE_COMMAND", True)
    try:
        with gc_paused():
            kept += [[i] for i in range(1000)]
        assert gc.get_freeze_count() >= before + 2000 and gc.isenabled()
    finally:
        gc.unfreeze()  # back to the oldest generation: this process goes on


def test_loading_a_model_runs_with_the_collector_held(monkeypatch):
    import pgraft_cli.io.checkpoints as checkpoints
    from pgraft_cli.io.recipes import load_recipe
    from pgraft_cli.pipelines.skeleton import load

    seen = []

    def fake_load_model(model, **kwargs):
        seen.append(gc.isenabled())
        if model == "broken":
            raise PgraftError("broken model")
        return "loaded"

    monkeypatch.setattr(checkpoints, "load_model", fake_load_model)
    recipe = load_recipe("default")
    assert load("digits", None, None, False, recipe) == "loaded"
    with pytest.raises(PgraftError, match="broken model"):
        load("broken", None, None, False, recipe)
    assert seen == [False, False] and gc.isenabled()


def test_the_console_entry_freezes_but_an_in_process_run_does_not(tmp_path, monkeypatch):
    """``pgraft`` (``cli.console``) freezes what it built (the interpreter's last collection skips it) at
    the end of the model's load and at its exit; ``cli.main`` in a process that goes on (the tests'),
    never: frozen objects are never collected."""
    import tomllib
    from pathlib import Path

    from pgraft_cli.cli import main

    before = gc.get_freeze_count()
    monkeypatch.setattr("sys.argv", ["pgraft", "inspect", "digits", "--json"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0 and gc.get_freeze_count() == before
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pgraft": "pgraft_cli.cli:console"}
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
             "from pgraft_cli.cli import console\n"
             "sys.argv = ['pgraft'] + sys.argv[1:]\n"
             "console()\n")
    for argv, code in ((["recipes", "ls"], 0), (["recipes", "show", "no-such-recipe"], 2)):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == code, done.stderr
        frozen = int(done.stdout.strip().splitlines()[-1].split()[-1])
        assert frozen > 1000  # every module's objects, not just a few
