"""The end-of-scenario checker (RELIABILITY.md §3.3): combine what the client
was told (acked submits), what the store says (final runs and their
history) and what the workers did (ledgers) into the figures we publish.

`check(...)` writes artifacts/faults/<scenario>.json and returns the figures;
the scenario then asserts lost, duplicate completions and overlaps are 0.
`executions`, `overlapping_runs`, `split_frozen` and `close_fenced_at_freeze`
work on ledger lines (possibly annotated: open executions closed at a `died`
time, an `until` time fixed by the scenario, times rebased onto one clock)
for figures beyond `check`'s; `check` reads executions the same way.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.harness.procs import ROOT

ARTIFACTS = Path(os.environ.get("BGTASKS_ARTIFACTS", ROOT / "artifacts")) / "faults"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def all_runs(base: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    cursor = None
    with httpx.Client(base_url=f"{base}/tasks", timeout=30) as client:
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/runs", params=params).json()
            runs.extend(page["runs"])
            cursor = page.get("next_cursor")
            if not cursor:
                return runs


def history(base: str, run_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/tasks/runs/{run_id}/history", timeout=30)
    response.raise_for_status()
    return list(response.json()["transitions"])


def completions(base: str, run_ids: list[str], clients: int = 4) -> dict[str, int]:
    """How many COMPLETED transitions each run's history holds, read over a
    few keep-alive clients at once (a soak checks thousands of runs)."""
    chunks = [run_ids[i::clients] for i in range(clients)]

    def read(chunk: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        with httpx.Client(base_url=f"{base}/tasks", timeout=30) as client:
            for run_id in chunk:
                response = client.get(f"/runs/{run_id}/history")
                response.raise_for_status()
                transitions = response.json()["transitions"]
                counts[run_id] = sum(t["to_state"] == "COMPLETED" for t in transitions)
        return counts

    found: dict[str, int] = {}
    with ThreadPoolExecutor(clients) as pool:
        for counts in pool.map(read, [c for c in chunks if c]):
            found.update(counts)
    return found


def read_ledgers(paths: list[Path]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for path in paths:
        if path.exists():
            entries += [json.loads(line) for line in path.read_text().splitlines() if line]
    return entries


def write_ledger(path: Path, lines: list[dict[str, Any]]) -> Path:
    """An annotated ledger (open executions closed, times rebased) for `check`."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def check(
    scenario: str,
    base: str,
    acked: list[str],
    ledgers: list[Path],
    *,
    indeterminate: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    runs = {r["id"]: r for r in all_runs(base)}
    entries = read_ledgers(ledgers)
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_run[entry["run_id"]].append(entry)

    lost = [run_id for run_id in acked if runs.get(run_id, {}).get("state") not in TERMINAL]
    done = completions(base, [r for r in acked if runs.get(r, {}).get("state") == "COMPLETED"])
    duplicate_completions = sum(count > 1 for count in done.values())

    overlaps = 0
    re_executions = 0
    spans = executions(entries)
    for events in by_run.values():
        re_executions += sum(e["event"] == "start" for e in events) > 1
    for intervals in spans.values():
        ordered = sorted((start, end) for start, end, _ in intervals)
        for (_, end_a), (start_b, _) in itertools.pairwise(ordered):
            overlaps += start_b < end_a

    failures = Counter(
        (runs[r].get("error") or {}).get("type", "none")
        for r in acked
        if runs.get(r, {}).get("state") in ("FAILED", "CRASHED")
    )
    figures: dict[str, Any] = {
        "scenario": scenario,
        "submitted_acked": len(acked),
        "submitted_indeterminate": indeterminate,
        "completed": len(done),
        "failed_terminal": dict(failures),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicate_completions": duplicate_completions,
        "concurrent_overlaps": overlaps,
        "re_executions": re_executions,
        "unexpected": len(set(by_run) - set(runs)),
        **(extra or {}),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{scenario}.json").write_text(json.dumps(figures, indent=2))
    return figures


def executions(lines: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, Any]]]:
    """Each run's executions as (start, end, pid). An execution is a `start`
    line; it ends at its `until` time when the scenario fixed one (a frozen
    worker's fenced run: see `close_fenced_at_freeze`), else at the first
    `end` or `cancelled` line of the same run, attempt and pid (a `tick` is a
    side effect, not an end), else at the start's `died` time (its process
    was killed, or was last seen alive), else at its start."""
    ends: dict[tuple[str, int, Any], list[float]] = defaultdict(list)
    for e in lines:
        if e["event"] in ("end", "cancelled"):
            ends[(e["run_id"], e["attempt"], e["pid"])].append(e["t"])
    found: dict[str, list[tuple[float, float, Any]]] = defaultdict(list)
    for e in lines:
        if e["event"] == "start":
            closed = ends.get((e["run_id"], e["attempt"], e["pid"]))
            end = e["until"] if "until" in e else min(closed) if closed else e.get("died", e["t"])
            found[e["run_id"]].append((e["t"], end, e["pid"]))
    return found


def overlapping_runs(lines: list[dict[str, Any]]) -> dict[str, int]:
    """For each run, the pairs of its executions whose intervals intersect,
    over all pairs (`check` compares neighbours in start order)."""
    found: dict[str, int] = {}
    for run_id, spans in executions(lines).items():
        pairs = sum(
            s1 < e2 and s2 < e1 for (s1, e1, _), (s2, e2, _) in itertools.combinations(spans, 2)
        )
        if pairs:
            found[run_id] = pairs
    return found


def count_overlaps(lines: list[dict[str, Any]]) -> int:
    """Pairs of executions of one run whose intervals intersect (all pairs)."""
    return sum(overlapping_runs(lines).values())


def split_frozen(
    lines: list[dict[str, Any]], pid: Any, stopped: float, resumed: float
) -> list[dict[str, Any]]:
    """A SIGSTOPped process executes nothing while frozen: model each of its
    executions spanning the freeze as two, before and after it, so overlaps
    count only time the process could act."""
    ended_before = {
        (e["run_id"], e["attempt"])
        for e in lines
        if e["pid"] == pid and e["event"] != "start" and e["t"] < stopped
    }
    out: list[dict[str, Any]] = []
    for e in lines:
        if e["pid"] != pid:
            out.append(e)
        elif e["event"] == "start" and e["t"] < stopped:
            if (e["run_id"], e["attempt"]) in ended_before:
                out.append(e)
            else:
                out.append({**e, "died": stopped})
                out.append({**e, "pid": f"{pid}-resumed", "t": resumed})
        elif e["t"] >= resumed:
            out.append({**e, "pid": f"{pid}-resumed"})
        else:
            out.append(e)
    return out


def close_fenced_at_freeze(
    lines: list[dict[str, Any]],
    pid: Any,
    stopped: float,
    resumed: float,
    since: float = float("-inf"),
) -> tuple[list[dict[str, Any]], int]:
    """A frozen process cannot stop itself; what it can do is take no step
    once it resumes. An execution of `pid` that began before the freeze and
    whose only line after the start is one `cancelled` written after the
    resume (its cancellation handler) ends at the freeze (`until`). Any
    other line after the resume (a tick, an `end`) is a step taken, and the
    execution keeps its whole frozen span. Only executions started at or
    after `since` are considered (a process frozen twice: the end of its
    previous freeze). Returns the lines and how many executions were closed
    at the freeze."""
    after: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in lines:
        if e["pid"] == pid and e["event"] != "start":
            after[(e["run_id"], e["attempt"])].append(e)
    out: list[dict[str, Any]] = []
    closed = 0
    for e in lines:
        if e["pid"] == pid and e["event"] == "start" and since <= e["t"] < stopped:
            rest = after.get((e["run_id"], e["attempt"]), [])
            if [x["event"] for x in rest] == ["cancelled"] and rest[0]["t"] >= resumed:
                e = {**e, "until": stopped}
                closed += 1
        out.append(e)
    return out, closed
