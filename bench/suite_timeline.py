"""Which xdist worker ran which test, and when: a pytest plugin, and its report.

    SUITE_TIMELINE=/tmp/t.jsonl PYTHONPATH=.:bench python -m pytest -q -n 2 -p suite_timeline   # record
    python bench/suite_timeline.py /tmp/t.jsonl                                                # report

Recording appends one JSON line per test (worker, test id, wall-clock start and end, set-up and tear-down
included) from the process that ran it. The report prints each worker's busy seconds, when it finished,
how long it sat idle while the other still ran (the tail), the longest tests, and each worker's last ones.
It also replays the recorded durations through two schedules, as pytest-xdist 3.x hands tests out:
``load`` (a quarter of the tests dealt round-robin in collection order, then more to whichever worker
runs low) and ``longest first`` (the same, the tests sorted by duration): the makespan each would give
with these durations, a deterministic comparison free of the box's load.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

_started: dict[str, float] = {}
_index: dict[str, int] = {}
_recording = False


def pytest_configure(config) -> None:
    global _recording
    # the xdist controller relays its workers' hooks: only a worker, or a run without workers, records
    _recording = bool(os.environ.get("SUITE_TIMELINE")) and (
        hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None))


def pytest_collection_finish(session) -> None:
    _index.update({item.nodeid: k for k, item in enumerate(session.items)})  # the order tests are handed out in


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if _recording:
        _started[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if _recording and nodeid in _started:
        line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": nodeid,
                "index": _index.get(nodeid, -1),
                "start": _started.pop(nodeid), "end": time.time()}
        with open(os.environ["SUITE_TIMELINE"], "a") as f:
            f.write(json.dumps(line) + "\n")


def simulate(durations: list[float], workers: int = 2) -> float:
    """The makespan of xdist's ``load`` schedule for tests of these durations, in this order: the first
    ``max(n // 4, 2 * workers)`` dealt round-robin, then, whenever a worker has under 2 queued, enough to
    refill it to ``max(2, n_left // 4 // workers)`` (pytest-xdist 3.x's LoadScheduling, without its
    per-message overheads)."""
    queues: list[list[float]] = [[] for _ in range(workers)]
    pending = list(durations)
    for k in range(min(len(pending), max(len(pending) // 4, 2 * workers))):
        queues[k % workers].append(pending.pop(0))
    clock = [0.0] * workers
    while any(queues):
        w = min((k for k in range(workers) if queues[k]), key=lambda k: clock[k])  # the next test to finish
        clock[w] += queues[w].pop(0)
        if len(queues[w]) < 2 and pending:
            want = max(2, len(pending) // 4 // workers) - len(queues[w])
            queues[w] += [pending.pop(0) for _ in range(min(want, len(pending)))]
    return max(clock)


def report(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    t0 = min(r["start"] for r in rows)
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_worker[r["worker"]].append(r)
    end = max(r["end"] for r in rows) - t0
    print(f"{len(rows)} tests, {end:.1f} s from the first start to the last end")
    print(f"{'worker':>6} {'tests':>5} {'busy s':>7} {'done at s':>9} {'idle tail s':>11}")
    for name, rs in sorted(by_worker.items()):
        done = max(r["end"] for r in rs) - t0
        print(f"{name:>6} {len(rs):>5} {sum(r['end'] - r['start'] for r in rs):>7.1f} {done:>9.1f} {end - done:>11.1f}")
    for name, rs in sorted(by_worker.items()):
        last = sorted(rs, key=lambda r: r["end"])[-3:]
        print(f"{name} last: " + "; ".join(f"{r['test']} {r['start'] - t0:.0f}-{r['end'] - t0:.0f} s" for r in last))
    longest = sorted(rows, key=lambda r: r["start"] - r["end"])[:25]
    print("longest:")
    for r in longest:
        print(f"  {r['end'] - r['start']:6.1f} s  {r['worker']}  at {r['start'] - t0:6.1f} s  {r['test']}")
    ordered = [r["end"] - r["start"] for r in sorted(rows, key=lambda r: r["index"])]  # collection order
    total = sum(ordered)
    print(f"replayed on 2 workers (sum {total:.1f} s, half {total / 2:.1f} s): load {simulate(ordered):.1f} s, "
          f"longest first {simulate(sorted(ordered, reverse=True)):.1f} s")


if __name__ == "__main__":
    report(sys.argv[1])
