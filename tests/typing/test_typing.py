"""The public API's types as a user sees them: `usage.py` checked with
`mypy --strict` in a subprocess (warn_unused_ignores: a wrong call that
stops being refused fails the check too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.procs import ROOT

USAGE = Path(__file__).with_name("usage.py")


@pytest.mark.timeout(600)  # a cold mypy cache checks FastAPI and pydantic too
def test_the_public_api_type_checks_as_a_user_writes_it() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--warn-unused-ignores",
            "--show-error-codes",
            str(USAGE.relative_to(ROOT)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stdout + done.stderr
