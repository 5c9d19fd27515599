"""④ The process a sync run executes in (`--sync-isolation process`): started
by the worker (`worker.isolation`), it imports the task modules, then runs
one run at a time, told what to run and when to stop over a pipe of JSON
lines, never pickle.

Its watchdog is the point: each run carries a deadline on the host's
monotonic clock, before the app can take the lease back, that only the
worker's lease renewals move. If it passes, the process ends itself
(`os._exit`), even when the worker is frozen (SIGSTOP) or cut off from the
app and can neither renew nor kill it. If the worker dies, the pipe closes
and the process ends at once.

    python -m fastapi_bgtasks.worker.child STDOUT_FD

fd 0 carries the worker's messages, fd 1 this process's replies; STDOUT_FD
is the worker's own standard output, which the task's prints go to.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import select
import signal
import sys
import threading
import time
from typing import Any

from ..states import ReportKind
from ..tasks import Task, TaskRegistry
from .context import RunContext, _current
from .execution import Verdict, _error_info, judge_result
from .isolation import BACKSTOP_SECONDS, WATCHDOG_EXIT

__all__ = ["main"]

log = logging.getLogger("fastapi_bgtasks.worker")


class Lines:
    """JSON lines read from a raw fd with a timeout (select, no buffering
    hidden from it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def next(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None on timeout; EOFError when the worker is gone."""
        while b"\n" not in self._buffer:
            readable, _, _ = select.select([self.fd], [], [], timeout)
            if not readable:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message


class Runner:
    """The run in progress (at most one), its deadline, and the watchdog."""

    def __init__(self, lines: Lines, reply_fd: int) -> None:
        self.lines = lines
        self.reply_fd = reply_fd
        self.lock = threading.Lock()
        self.deadline: float | None = None
        self.context: RunContext | None = None
        self.runs: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def reply(self, message: dict[str, Any]) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        while data:
            data = data[os.write(self.reply_fd, data) :]

    def listen(self) -> None:
        """The watchdog thread: reads the worker's messages until the deadline
        of the run in progress, and ends the process if it passes."""
        while True:
            with self.lock:
                deadline = self.deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = self.lines.next(timeout)
            except EOFError:  # the worker is gone: nobody renews, nobody reads
                os._exit(0)
            if message is None:
                self._check_deadline()
                continue
            op = message.get("op")
            with self.lock:
                if op == "run":
                    self.deadline = float(message["deadline"])
                    self.context = RunContext(
                        str(message["run_id"]), str(message["task"]), int(message["attempt"])
                    )
                    self._arm()
                    self.runs.put(message)
                elif op == "renew" and self.deadline is not None:
                    self.deadline = max(self.deadline, float(message["deadline"]))
                    self._arm()
                elif op == "stop" and self.context is not None:
                    self.context.stop.set()
            self._check_deadline()

    def _arm(self) -> None:
        """The backstop, under the lock: the kernel ends the process just
        after the deadline (SIGALRM's default action) even if the task holds
        the GIL so long that this thread cannot run."""
        if self.deadline is None:
            signal.setitimer(signal.ITIMER_REAL, 0)
        else:
            left = self.deadline + BACKSTOP_SECONDS - time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))

    def _check_deadline(self) -> None:
        with self.lock:
            if self.deadline is None or time.monotonic() < self.deadline:
                return
            run_id = self.context.run_id if self.context else "?"
        # Not through logging: its handlers may hold locks the task's thread has.
        os.write(2, f"Run {run_id}: lease deadline passed; its process stops now\n".encode())
        os._exit(WATCHDOG_EXIT)

    def serve(self, tasks: dict[str, Task[Any, Any]]) -> None:
        """Run what the worker sends, one run at a time, for ever."""
        while True:
            message = self.runs.get()
            with self.lock:
                context = self.context
            assert context is not None
            verdict = run_one(tasks.get(context.task), context, message)
            sys.stdout.flush()
            with self.lock:
                self.deadline = None
                self.context = None
                self._arm()
            error = verdict.error.model_dump() if verdict.error is not None else None
            kind = verdict.kind.value
            self.reply({"op": "done", "kind": kind, "result": verdict.result, "error": error})


def run_one(task: Task[Any, Any] | None, context: RunContext, message: dict[str, Any]) -> Verdict:
    """Call the task with its arguments loaded from JSON, as the worker's
    thread would: `current_run()` and `cancelled()` work inside."""
    if task is None:
        error = _error_info(LookupError(f"Task {context.task!r} is not in this process."))
        return Verdict(ReportKind.FAILED, error=error)
    token = _current.set(context)
    try:
        args, kwargs = task.load_arguments(message["args"], message["kwargs"])
        value = task.fn(*args, **kwargs)
        return judge_result(task, value, int(message["max_result_bytes"]))
    except Exception as exc:
        return Verdict(ReportKind.FAILED, error=_error_info(exc))
    finally:
        _current.reset(token)


def find_tasks(setup: dict[str, Any]) -> tuple[dict[str, Task[Any, Any]], dict[str, str]]:
    """Import the worker's modules, then find each task it names by name in
    the registries they hold. Returns the tasks found and why others were not."""
    found: dict[str, Task[Any, Any]] = {}
    missing: dict[str, str] = {}
    for name in setup["imports"]:
        importlib.import_module(name)
    for spec in setup["tasks"]:
        name, module_name = str(spec["name"]), str(spec["module"])
        if module_name == "__main__":
            missing[name] = "it is defined in __main__, which a child process cannot import"
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            missing[name] = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
            continue
        for value in list(vars(module).values()):
            registry = (
                value.registry if isinstance(value, Task) else getattr(value, "registry", None)
            )
            task = registry.tasks.get(name) if isinstance(registry, TaskRegistry) else None
            if task is not None and task.fn.__qualname__ == spec["qualname"]:
                found[name] = task
                break
        else:
            missing[name] = f"no task of that name in {module_name}"
    return found, missing


def main(argv: list[str]) -> None:
    stdout_fd = int(argv[0])
    reply_fd = os.dup(1)
    os.dup2(stdout_fd, 1)  # the task's prints go where the worker's go
    os.close(stdout_fd)
    if os.isatty(1):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    command_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    lines = Lines(command_fd)
    setup = lines.next(None)
    assert setup is not None
    sys.path[:] = [str(p) for p in setup["path"]]
    # What the tasks submit goes back to the app that feeds the worker.
    os.environ["BGTASKS_URL"] = str(setup["url"])
    if setup.get("token"):
        os.environ["BGTASKS_TOKEN"] = str(setup["token"])
    logging.basicConfig(
        level=setup.get("log_level") or logging.INFO,
        format="%(asctime)s.%(msecs)03d | %(levelname)-7s | %(message)s",
        datefmt="%H:%M:%S",
    )
    runner = Runner(lines, reply_fd)
    try:
        tasks, missing = find_tasks(setup)
    except Exception as exc:
        runner.reply(
            {"op": "ready", "tasks": [], "missing": {}, "error": f"{type(exc).__name__}: {exc}"}
        )
        return
    runner.reply({"op": "ready", "tasks": sorted(tasks), "missing": missing})
    threading.Thread(target=runner.listen, name="watchdog", daemon=True).start()
    runner.serve(tasks)


if __name__ == "__main__":
    main(sys.argv[1:])
