"""CI gates: ``--fail-if "fid>12"`` turns a run's metrics into an exit code a CI job can trust.

A gate is ``NAME OP NUMBER`` with OP one of ``> >= < <= == !=``; it *fails* (exit 1) when the
comparison holds. NAME is a metric of the run's result (the corrected or tuned model for
``correct`` / ``finetune``, the evaluated model for ``evaluate``); ``base.NAME`` reads the base
model's metric instead. ``reward`` is short for ``reward_mean``. A malformed gate or an unknown
name is a user mistake (:class:`PgraftError`, exit 2), reported before any work starts where it can be.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import PgraftError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
ALIASES = {"reward": "reward_mean"}
# Every name a gate may use; which of them a run has depends on the verb (see :func:`gate_metrics`).
_SAMPLER = ("fid", "kid", "precision", "recall", "pairwise_distance", "nfe", "flops_per_image", "seconds_per_image",
            "num", "steps")
_REWARD = ("reward_mean", "reward_std", "reward_best_of_mean")
_INVERSION = ("reconstruction_rms_mean", "reconstruction_rms_max", "reconstruction_abs_max", "noise_mean", "noise_std",
              "noise_norm_mean")
METRICS = (*_SAMPLER, *_REWARD, *_INVERSION)
SYNTAX = 'NAME OP NUMBER with OP one of > >= < <= == != (e.g. --fail-if "fid>12" --fail-if "reward<0.5")'
_GATE = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[^<>=!\s]+)\s*$")


@dataclass(frozen=True)
class Gate:
    """``name op value``: fails when ``metric(name) op value`` holds."""

    text: str
    name: str  # canonical: "fid", "base.fid", "reward_mean" ...
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.value:g}"


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: Optional[float]  # None: the run did not measure this metric
    failed: bool

    @property
    def line(self) -> str:
        """One line for the terminal: why this gate failed (or that it held)."""
        g = self.gate
        if self.value is None:
            return f"gate failed: {g.text.strip()} ({g.name} was not measured in this run)"
        verdict = "gate failed" if self.failed else "gate held"
        return f"{verdict}: {g.text.strip()} ({g.name} = {self.value:.6g})"

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate.text, "metric": self.gate.name, "op": self.gate.op, "threshold": self.gate.value,
                "value": self.value, "failed": self.failed}


def _canonical(name: str) -> str:
    prefix, _, metric = name.rpartition(".")
    metric = ALIASES.get(metric, metric)
    return f"{prefix}.{metric}" if prefix else metric


def parse_gate(text: str) -> Gate:
    """Parse ``NAME OP NUMBER``; a :class:`PgraftError` naming the expression and the syntax otherwise."""
    match = _GATE.match(text or "")
    if match is None:
        raise PgraftError(f"--fail-if {text!r} is not a gate: write {SYNTAX}")
    try:
        value = float(match["value"])
    except ValueError:
        raise PgraftError(f"--fail-if {text!r}: {match['value']!r} is not a number; write {SYNTAX}") from None
    if math.isnan(value):
        raise PgraftError(f"--fail-if {text!r}: the threshold must be a number, not NaN; write {SYNTAX}")
    name = _canonical(match["name"])
    prefix, _, metric = name.rpartition(".")
    if prefix not in ("", "base") or metric not in METRICS:
        known = ", ".join(sorted({*METRICS, *ALIASES}))
        raise PgraftError(f"--fail-if {text!r}: unknown metric {match['name']!r}; use one of {known} "
                          f"(prefix base. for the base model's value, e.g. base.fid)")
    return Gate(text, name, match["op"], value)


def gate_names(verb: str, reward: bool = True) -> set[str]:
    """The names a verb's gates can read: ``correct`` has no reward, ``evaluate`` one only with --reward."""
    result = set(_SAMPLER) | (set(_REWARD) if reward and verb != "correct" else set())
    base = {f"base.{n}" for n in result} if verb != "evaluate" else set()  # before the inversion-only names
    if verb == "correct":
        result |= set(_INVERSION)
    return result | base


def parse_gates(texts: Optional[list[str]], available: Optional[set[str]] = None) -> list[Gate]:
    """Parse every ``--fail-if``; with ``available`` (:func:`gate_names`), refuse names the run cannot have
    before any work starts."""
    gates = [parse_gate(t) for t in texts or []]
    for gate in gates:
        if available is not None and gate.name not in available:
            hint = (" (only evaluate --reward and finetune measure a reward)"
                    if "reward" in gate.name and "reward_mean" not in available else "")
            raise PgraftError(f"--fail-if {gate.text!r}: this command measures no {gate.name!r}{hint}; it has: "
                              f"{', '.join(sorted(available))}")
    return gates


def gate_metrics(result: dict[str, Any], base: Optional[dict[str, Any]] = None,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The flat metric namespace gates read: ``result``'s and ``extra``'s keys, ``base.`` + ``base``'s."""
    flat = {k: v for k, v in {**(extra or {}), **result}.items() if k in METRICS}
    for k, v in (base or {}).items():
        if k in METRICS:
            flat[f"base.{k}"] = v
    return flat


def check_gates(gates: list[Gate], metrics: dict[str, Any]) -> list[GateResult]:
    """Evaluate each gate against ``metrics`` (from :func:`gate_metrics`).

    A metric this kind of run does not have at all is an error (exit 2, listing what it has); one it
    has but did not measure (``fid`` without reference data: None) or a NaN fails the gate.
    """
    results = []
    for gate in gates:
        if gate.name not in metrics:
            have = ", ".join(sorted(metrics)) or "none"
            raise PgraftError(f"--fail-if {gate.text!r}: this run has no metric {gate.name!r}; it has: {have}")
        raw = metrics[gate.name]
        value = None if raw is None else float(raw)
        if value is None or math.isnan(value):
            results.append(GateResult(gate, None, True))
            continue
        results.append(GateResult(gate, value, bool(OPERATORS[gate.op](value, gate.value))))
    return results


def failed(results: list[GateResult]) -> list[GateResult]:
    return [r for r in results if r.failed]
