"""CI gates: ``--fail-if "fid>12"`` turns a run's metrics into an exit code a CI job can trust.

A gate is ``NAME OP NUMBER`` with OP one of ``> >= < <= == !=``; it *fails* (exit 1) when the
comparison holds. NAME is a metric of the run's result (the corrected or tuned model for
``correct`` / ``finetune``, the evaluated model for ``evaluate``); ``base.NAME`` reads the base
model's metric instead. ``reward`` is short for ``reward_mean``. ``judge.NAME`` (``base.judge.NAME``)
reads a ``finetune --judge``'s mean. A malformed gate or an unknown name is a user mistake
(:class:`PgraftError`, exit 2), reported before any work starts where it can be.

``finetune --stop-if "NAME dropped|rose by more than Y[%]"`` (:func:`parse_stop`) ends the rounds
early when a per-round metric moved that far from round 1's (the base model's samples).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

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
_COPYING = ("copy_z", "copy_auc", "copy_near", "copy_near_z", "copy_ct", "copy_cell_p")  # correct's data-copying test (stages.evaluate.copying)
METRICS = (*_SAMPLER, *_REWARD, *_INVERSION, *_COPYING)
SYNTAX = 'NAME OP NUMBER with OP one of > >= < <= == != (e.g. --fail-if "fid>12" --fail-if "reward<-6")'
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


def _match_number(pattern: re.Pattern[str], text: str, flag: str, what: str, syntax: str) -> tuple[re.Match[str], float]:
    """``flag``'s expression ``text`` matched by ``pattern`` and its ``value`` group as a float; a
    :class:`PgraftError` naming the expression and the ``syntax`` otherwise."""
    match = pattern.match(text or "")
    if match is None:
        raise PgraftError(f"{flag} {text!r} is not {what}: write {syntax}")
    try:
        return match, float(match["value"])
    except ValueError:
        raise PgraftError(f"{flag} {text!r}: {match['value']!r} is not a number; write {syntax}") from None


def parse_gate(text: str) -> Gate:
    """Parse ``NAME OP NUMBER``; a :class:`PgraftError` naming the expression and the syntax otherwise."""
    match, value = _match_number(_GATE, text, "--fail-if", "a gate", SYNTAX)
    if math.isnan(value):
        raise PgraftError(f"--fail-if {text!r}: the threshold must be a number, not NaN; write {SYNTAX}")
    name = _canonical(match["name"])
    prefix, _, metric = name.rpartition(".")
    if prefix in ("judge", "base.judge"):  # a judge's name; which judges the run has is checked later
        return Gate(text, match["name"], match["op"], value)
    if prefix not in ("", "base") or metric not in METRICS:
        known = ", ".join(sorted({*METRICS, *ALIASES}))
        raise PgraftError(f"--fail-if {text!r}: unknown metric {match['name']!r}; use one of {known} "
                          f"(prefix base. for the base model's value, e.g. base.fid)")
    return Gate(text, name, match["op"], value)


def gate_names(verb: str, reward: bool = True, judges: Iterable[str] = (), grouped: bool = True) -> set[str]:
    """The names a verb's gates can read: ``correct`` has no reward, ``evaluate`` one only with --reward,
    ``reward_best_of_mean`` only where the run's images form groups (``grouped``: prompts, or --best-of);
    ``judges``: the names of finetune's ``--judge`` rewards (``judge.NAME``); ``correct`` adds the
    inversion's statistics and the data-copying test's ``copy_z``, ``copy_auc``, ``copy_near``, ``copy_near_z``, ``copy_ct``
    and ``copy_cell_p``."""
    rewards = {n for n in _REWARD if grouped or n != "reward_best_of_mean"}
    result = (set(_SAMPLER) | (rewards if reward and verb != "correct" else set()) | {f"judge.{n}" for n in judges}
              | (set(_COPYING) if verb == "correct" else set()))
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
                    if "reward" in gate.name and "reward_mean" not in available else
                    " (best-of-n groups a run's images by prompt: pass --prompt/--prompts, or --best-of N)"
                    if gate.name.endswith("reward_best_of_mean") else "")
            raise PgraftError(f"--fail-if {gate.text!r}: this command measures no {gate.name!r}{hint}; it has: "
                              f"{', '.join(sorted(available))}")
    return gates


def gate_metrics(result: dict[str, Any], base: Optional[dict[str, Any]] = None,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The flat metric namespace gates read: ``result``'s and ``extra``'s keys, ``base.`` + ``base``'s
    (``judge.NAME`` for each of a result's ``judges``)."""
    def names(r: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in r.items() if k in METRICS},
                **{f"judge.{n}": v for n, v in (r.get("judges") or {}).items()}}

    flat = names({**(extra or {}), **result})
    flat.update({f"base.{k}": v for k, v in names(base or {}).items()})
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


# ----------------------------------------------------------------------------------------------
# finetune --judge NAME=SPEC and --stop-if "NAME dropped by more than Y"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def judge_names(specs: Optional[list[str]]) -> list[tuple[str, str]]:
    """``--judge [NAME=]SPEC`` -> ``[(name, spec)]``. Without ``NAME=``, the name is the reward's
    (``pickscore:P`` -> ``pickscore``; a weighted sum -> ``weighted``), numbered from the second of a
    name on (``pickscore_2``); ``judge.NAME`` is how gates, ``--stop-if`` and the report call it."""
    out: dict[str, str] = {}
    for text in specs or []:
        name, eq, spec = (part.strip() for part in text.partition("="))
        if not (eq and _IDENT.match(name)):
            name, spec = ("weighted" if "*" in text else re.sub(r"\W", "_", text.split(":")[0].strip()) or "judge"), text.strip()
            base, k = name, 1
            while name in out:
                k += 1
                name = f"{base}_{k}"
        elif name in out:
            raise PgraftError(f"--judge {text!r}: a judge is already called {name!r}; give each its own NAME=")
        if not spec:
            raise PgraftError(f"--judge {text!r} names no reward; write --judge [NAME=]REWARD (e.g. judge=classifier:judge:3)")
        out[name] = spec
    return list(out.items())


STOP_SYNTAX = ('"NAME dropped by more than Y" or "NAME rose by more than Y" (Y a number, or a percentage of '
               'round 1\'s value: 10%), e.g. --stop-if "judge.aesthetic dropped by more than 0.5"')
STOP_ALIASES = {"diversity": "pairwise_distance", "reward_mean": "reward"}
_STOP = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s+(?P<dir>dropped|rose)\s+by\s+more\s+than\s+"
                   r"(?P<value>[^%\s]+)\s*(?P<pct>%)?\s*$", re.IGNORECASE)
# What each round measures: the training reward of its samples, each judge, FID and diversity.
ROUND_METRICS = ("reward", "fid", "kid", "precision", "recall", "pairwise_distance")


@dataclass(frozen=True)
class StopRule:
    """Stop when ``name`` moved the ``direction`` way from round 1's value by more than ``amount``
    (``relative``: ``amount`` percent of ``|round 1's value|``)."""

    text: str
    name: str
    direction: str  # "dropped" or "rose"
    amount: float
    relative: bool = False

    def moved(self, first: float, now: float) -> float:
        """How far the metric moved the rule's way: ``first - now`` (dropped) or ``now - first`` (rose),
        in percent of ``|first|`` when relative."""
        d = first - now if self.direction == "dropped" else now - first
        return 100 * d / abs(first) if self.relative else d

    def fires(self, first: float, now: float) -> bool:
        if self.relative and first == 0:
            return False
        return self.moved(first, now) > self.amount


def parse_stop(text: str, available: Optional[set[str]] = None) -> StopRule:
    """Parse one ``--stop-if``; ``available`` (the metrics the run measures every round) refuses the others."""
    match, amount = _match_number(_STOP, text, "--stop-if", "a stop rule", STOP_SYNTAX)
    if not math.isfinite(amount) or amount < 0:
        raise PgraftError(f"--stop-if {text!r}: the amount must be a finite number >= 0; write {STOP_SYNTAX}")
    name = STOP_ALIASES.get(match["name"], match["name"])
    known = name in ROUND_METRICS or (name.startswith("judge.") and _IDENT.match(name[6:]))
    if not known or (available is not None and name not in available):
        have = ", ".join(sorted(available if available is not None else ROUND_METRICS))
        raise PgraftError(f"--stop-if {text!r}: this run measures no {match['name']!r} every round; it has: {have}")
    return StopRule(text, name, match["dir"].lower(), amount, bool(match["pct"]))


def round_metrics(record: dict[str, Any]) -> dict[str, Optional[float]]:
    """The per-round values stop rules read from one round's record (``stages.finetune.run_rounds``)."""
    values = {k: record.get(k) for k in ROUND_METRICS if k != "reward"}
    values["reward"] = (record.get("sampled") or {}).get("reward_mean")
    values.update({f"judge.{n}": v for n, v in (record.get("judges") or {}).items()})
    return values


def check_stop(rules: list[StopRule], history: list[dict[str, Any]]) -> Optional[str]:
    """Why the rounds stop after ``history``'s last round (None: they go on). Each rule compares the
    last round's value with round 1's (the base model's samples); unmeasured values never fire."""
    if len(history) < 2:
        return None
    return _fired(rules, round_metrics(history[0]), round_metrics(history[-1]), "round 1",
                  f"round {history[-1]['round']}")


def check_final_stop(rules: list[StopRule], base: dict[str, Any], tuned: dict[str, Any]) -> Optional[str]:
    """Why the final tuned model fails (None: it passes): each rule compares ``evaluate_pair``'s tuned
    model with the base model, both sampled on the evaluation's seeds (the rounds never measure it)."""
    def values(m: dict[str, Any]) -> dict[str, Optional[float]]:
        return round_metrics({**m, "sampled": {"reward_mean": m.get("reward_mean")}})

    return _fired(rules, values(base), values(tuned), "the base model", "the tuned model")


def _fired(rules: list[StopRule], first: dict[str, Any], last: dict[str, Any], was: str, now: str) -> Optional[str]:
    for rule in rules:
        a, b = first.get(rule.name), last.get(rule.name)
        if a is None or b is None or not rule.fires(float(a), float(b)):
            continue
        unit = "%" if rule.relative else ""
        return (f"{rule.name} {rule.direction} by {rule.moved(float(a), float(b)):.4g}{unit} (from {float(a):.4g} in "
                f"{was} to {float(b):.4g} in {now}), more than {rule.amount:g}{unit}")
    return None
