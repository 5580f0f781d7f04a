"""Errors a user can act on.

Every error pgraft raises on purpose is a :class:`PgraftError`. The CLI prints its message as one
``error:`` line and exits with its ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PgraftError(Exception):
    """A problem with the user's input or environment; the message says what to do."""

    exit_code = 2


class ModelLoadError(PgraftError):
    """A model path, file, config or hub id could not be loaded."""


class UnsafeFileError(ModelLoadError):
    """A pickle-based checkpoint was refused (it can run arbitrary code when loaded)."""


class RecipeError(PgraftError):
    """A recipe or a ``--set`` override is invalid."""


class RunLockedError(PgraftError):
    """Another pgraft process holds the run directory."""


class RunStoreError(PgraftError):
    """The run directory is inconsistent with the requested work."""


class OutputPathError(PgraftError):
    """An output path (--out, --run-dir) is the wrong kind of thing or cannot be written."""


class StoppedError(PgraftError):
    """``finetune --stop-if`` ended the rounds before any fine-tuned model passed: nothing was written."""

    exit_code = 1
