"""The worker measures a result as the app stores it (UTF-8 bytes of compact
JSON), so both refuse the same results: a non-ASCII result under the limit
completes, one byte over fails as ResultTooLarge in the worker, before it is
sent. And whatever an exception's message holds, its report is valid UTF-8.
A real app and worker process serve tests/worker/workerapp.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fastapi_bgtasks.wire import stored_size
from tests import timing
from tests.harness.procs import Proc, start_app, start_worker
from tests.worker.workerapp import LIMIT

MODULE = "tests.worker.workerapp"
# `"` + 332 * 3 bytes + `"`: 998 bytes stored, 1994 as ASCII-escaped JSON.
UNDER = (LIMIT - 2) // 3
OVER = UNDER + 1


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[str]:
    procs: list[Proc] = []
    try:
        app, base = start_app(db_url, tmp_path, module=f"{MODULE}:app")
        procs.append(app)
        procs.append(start_worker(f"{base}/tasks", db_url, tmp_path, modules=(MODULE,)))
        yield base
    finally:
        for proc in reversed(procs):
            proc.stop()


def _run(base: str, task: str, *args: object) -> dict[str, Any]:
    body = {"task": task, "args": list(args)}
    response = httpx.post(f"{base}/tasks/runs", json=body, timeout=5)
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    deadline = time.monotonic() + timing.DEADLINE
    while True:
        doc: dict[str, Any] = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=5).json()
        if doc["state"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return doc
        assert time.monotonic() < deadline, f"run {run_id} still {doc['state']}"
        time.sleep(0.02)


def test_the_sizes_straddle_the_limit_as_stored() -> None:
    assert stored_size("語" * UNDER) == LIMIT - 2
    assert stored_size("語" * OVER) == LIMIT + 1


def test_a_non_ascii_result_under_the_limit_as_stored_completes(served: str) -> None:
    doc = _run(served, "cjk", UNDER)
    assert (doc["state"], doc["result"]) == ("COMPLETED", "語" * UNDER)


def test_a_non_ascii_result_just_over_the_limit_fails_in_the_worker(served: str) -> None:
    doc = _run(served, "cjk", OVER)
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "ResultTooLarge"
    # The worker's words, not the app's: it refused the result before sending.
    assert doc["error"]["message"] == (
        f"The result is {LIMIT + 1} bytes as stored JSON (UTF-8); the limit is {LIMIT}."
    )


def test_an_exception_message_that_is_not_valid_unicode_is_reported_cleaned(served: str) -> None:
    doc = _run(served, "unspeakable")
    assert doc["state"] == "FAILED"
    assert doc["error"]["type"] == "ValueError"
    assert doc["error"]["message"] == "lone surrogate: ? end"
    assert "lone surrogate: ? end" in doc["error"]["traceback"]
