"""The end-of-scenario checker (RELIABILITY.md §3.3): combine what the client
was told (acked submits), what the store says (final runs and their
history) and what the workers did (ledgers) into the figures we publish.

`check(...)` writes artifacts/faults/<scenario>.json and returns the figures;
the scenario then asserts lost, duplicate completions and overlaps are 0.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter, defaultdict
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


def read_ledgers(paths: list[Path]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for path in paths:
        if path.exists():
            entries += [json.loads(line) for line in path.read_text().splitlines() if line]
    return entries


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
    completions = 0
    duplicate_completions = 0
    for run_id in acked:
        if runs.get(run_id, {}).get("state") == "COMPLETED":
            completions += 1
            done = [t for t in history(base, run_id) if t["to_state"] == "COMPLETED"]
            duplicate_completions += len(done) > 1

    overlaps = 0
    re_executions = 0
    for events in by_run.values():
        starts = [e for e in events if e["event"] == "start"]
        re_executions += len(starts) > 1
        intervals = []
        for start in starts:
            ends = [
                e["t"]
                for e in events
                if e["event"] in ("end", "cancelled")
                and e["attempt"] == start["attempt"]
                and e["pid"] == start["pid"]
            ]
            # No end: the process died; it ran until at most its death.
            intervals.append((start["t"], min(ends) if ends else start.get("died", start["t"])))
        intervals.sort()
        for (_, end_a), (start_b, _) in itertools.pairwise(intervals):
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
        "completed": completions,
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
