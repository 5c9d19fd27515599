"""Printing a workload's table and writing the JSON beside it.

A table shows the median of each figure over the repetitions; the JSON keeps
every repetition's figures as well, so a surprising median can be checked
against its samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = ".0f"


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def table(title: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """One line per backend: its medians, or why it has none (skipped, error)."""
    widths = [max(len(c.header), 7) for c in columns]
    header = f"{'backend':<10}" + "".join(
        f"  {c.header:>{w}}" for c, w in zip(columns, widths, strict=True)
    )
    lines = [title, header]
    for row in rows:
        start = f"{row['backend']:<10}"
        if row.get("error"):
            lines.append(f"{start}  error: {row['error'].splitlines()[0][:200]}")
        elif row.get("skipped"):
            lines.append(f"{start}  skipped: {row['skipped']}")
        else:
            median = row["median"]
            lines.append(
                start
                + "".join(
                    f"  {_cell(median.get(c.key), c.fmt):>{w}}"
                    for c, w in zip(columns, widths, strict=True)
                )
            )
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Written after every workload, so a long run that fails late keeps
    what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
