"""The soak's child-process watch (`tests/faults/children.py`) dates a
child's end after its death and close to it: killed and left a zombie by a
parent that does not reap it (a frozen worker), and killed after its parent
died (reparented)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.faults.children import ChildWatch

PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"  # never reaps: a killed child stays a zombie
)


@pytest.fixture
def family() -> Iterator[tuple[subprocess.Popen[str], int]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        yield parent, child
    finally:
        for pid in (child, parent.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait(5)


def watched(parent: int) -> ChildWatch:
    watch = ChildWatch(lambda: [parent])
    watch.start()
    return watch


def wait_gone(watch: ChildWatch, pid: int) -> float:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        life = watch.life_of(pid, time.time())
        if life is not None and life.gone is not None:
            return life.gone
        time.sleep(0.01)
    raise AssertionError(f"child {pid} never seen gone: {watch.lives}")


def wait_seen(watch: ChildWatch, pid: int) -> None:
    deadline = time.monotonic() + 5
    while watch.life_of(pid, time.time()) is None:
        assert time.monotonic() < deadline, "child never seen"
        time.sleep(0.01)


def test_a_killed_child_left_a_zombie_is_gone_after_its_death(
    family: tuple[subprocess.Popen[str], int],
) -> None:
    parent, child = family
    watch = watched(parent.pid)
    try:
        wait_seen(watch, child)
        killed = time.monotonic()
        os.kill(child, signal.SIGKILL)
        gone = wait_gone(watch, child)
    finally:
        watch.halt.set()
        watch.join(5)
    assert killed <= gone <= killed + 0.5, (killed, gone)


def test_a_child_is_followed_after_its_parent_died(
    family: tuple[subprocess.Popen[str], int],
) -> None:
    parent, child = family
    watch = watched(parent.pid)
    try:
        wait_seen(watch, child)
        parent.kill()
        parent.wait(5)
        time.sleep(0.2)
        life = watch.life_of(child, time.time())
        assert life is not None and life.gone is None, life
        killed = time.monotonic()
        os.kill(child, signal.SIGKILL)
        gone = wait_gone(watch, child)
    finally:
        watch.halt.set()
        watch.join(5)
    assert killed <= gone <= killed + 0.5, (killed, gone)
