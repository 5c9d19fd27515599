"""Render the fault suite's figures (artifacts/faults/*.json) as the tables
of docs/reliability.md:

    python -m tests.faults.report
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tests.faults.checker import ARTIFACTS


def _recovery(figures: dict[str, Any]) -> str:
    values = figures.get("recovery_s")
    if isinstance(values, dict) and values:
        return ", ".join(f"{k} {v:.2f}" for k, v in values.items() if isinstance(v, int | float))
    if isinstance(values, int | float):
        return f"{values:.2f}"
    return ""


def reliability(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | submitted | completed | lost | duplicate completions | overlaps "
        "| re-executions | recovery (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in rows:
        if "submitted_acked" not in f:
            continue
        lines.append(
            f"| {f['scenario']} | {f['submitted_acked']} | {f.get('completed', '')} "
            f"| {f.get('lost', '')} | {f.get('duplicate_completions', '')} "
            f"| {f.get('concurrent_overlaps', '')} | {f.get('re_executions', '')} "
            f"| {_recovery(f)} |"
        )
    return "\n".join(lines)


def security(summary: dict[str, Any]) -> str:
    lines = [
        "| category | bad inputs tried | rejected cleanly | accepted as valid | server errors "
        "| wrongly accepted |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in summary.get("categories", {}).items():
        lines.append(
            f"| {name} | {c.get('bad_inputs_tried', '')} | {c.get('rejected_cleanly', '')} "
            f"| {c.get('accepted_as_valid', '')} | {c.get('server_errors', '')} "
            f"| {c.get('wrongly_accepted', '')} |"
        )
    return "\n".join(lines)


def main() -> int:
    rows = []
    summary: dict[str, Any] = {}
    for path in sorted(ARTIFACTS.glob("*.json")):
        data = json.loads(path.read_text())
        if path.name == "security.json":
            summary = data
        elif isinstance(data, dict) and "scenario" in data:
            rows.append(data)
    print("## Reliability\n")
    print(reliability(rows))
    print("\n## Security\n")
    print(security(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
