"""Start and stop real processes: uvicorn serving the host app, worker CLIs.

Signals go only to pids these helpers started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests import timing

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose combined output goes to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args = args
        self.log = log
        self._file = open(log, "ab")
        self.popen = subprocess.Popen(
            args, stdout=self._file, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(
        self, pattern: str, timeout: float = timing.DEADLINE, start: int = 0
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.output(), start)
            if match:
                return match
            if self.popen.poll() is not None:
                match = regex.search(self.output(), start)
                if match:
                    return match
                code = self.popen.returncode
                raise AssertionError(
                    f"{self.args} exited {code} before {pattern!r}:\n{self.output()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {pattern!r} in:\n{self.output()}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._file.close()
        return int(self.popen.returncode)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def child_env(db_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BGTASKS_URL", None)
    env.pop("BGTASKS_TOKEN", None)
    env.update(
        {
            "BGTASKS_DATABASE_URL": db_url,
            "BGTASKS_TEST_DIR": str(tmp),
            "BGTASKS_TEST_LEDGER": str(tmp / "ledger.jsonl"),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def start_app(
    db_url: str,
    tmp: Path,
    *,
    module: str = "tests.harness.hostapp:app",
    port: int | None = None,
    name: str = "app",
    **env: str,
) -> tuple[Proc, str]:
    """uvicorn on a loopback port; returns once /tasks/health answers 200."""
    port = port or free_port()
    proc = Proc(
        [
            sys.executable,
            "-m",
            "uvicorn",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "10",
        ],
        tmp / f"{name}-{port}.log",
        child_env(db_url, tmp, **env),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timing.DEADLINE
    while True:
        try:
            if httpx.get(f"{base}/tasks/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"app did not start:\n{proc.output()}")
        time.sleep(0.05)


def start_worker(
    url: str,
    db_url: str,
    tmp: Path,
    *args: str,
    modules: tuple[str, ...] = ("tests.harness.hostapp",),
    concurrency: int = 4,
    name: str = "worker",
    wait: bool = True,
    **env: str,
) -> Proc:
    """The worker CLI; returns once it logged that it connected."""
    log = tmp / f"{name}-{time.monotonic_ns()}.log"
    proc = Proc(
        [
            sys.executable,
            "-m",
            "fastapi_bgtasks.worker",
            *modules,
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            *args,
        ],
        log,
        # Workers hold no database credentials: prove it by not passing any.
        {k: v for k, v in child_env(db_url, tmp, **env).items() if k != "BGTASKS_DATABASE_URL"},
    )
    if wait:
        proc.wait_for(r"Worker \S+ connected to")
    return proc
