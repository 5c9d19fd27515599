"""④ Where a worker runs sync tasks by default: child processes it can stop
(`worker.child`), so a sync run never outlives its lease. A thread cannot
be stopped; a process can be killed, and kills itself on a deadline the
worker moves only while it renews the lease.

Children are reused, one run at a time each; one that was killed, or whose
run killed it, is replaced. Messages are JSON lines over pipes: the task's
name and JSON arguments go in, a JSON result or error comes back.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from ..states import ReportKind, StopReason
from ..wire import ErrorInfo
from .config import FeedTerms, WorkerConfig
from .held import HeldRun

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["BACKSTOP_SECONDS", "WATCHDOG_EXIT", "ChildPool", "Reply"]

log = logging.getLogger("fastapi_bgtasks.worker")

Reply = tuple[ReportKind, Any, ErrorInfo | None]

# The exit status of a child whose watchdog fired: read as "the lease may be
# gone", not as a task that killed its process.
WATCHDOG_EXIT = 86
# A child still alive this long after its deadline is ended by the kernel
# (SIGALRM): a task holding the GIL can delay the watchdog thread.
BACKSTOP_SECONDS = 0.1
# How long a cancelled or timed-out run may take to return after it sees
# `cancelled()`, before its process is killed.
STOP_GRACE = 2.0
# How often a running child's deadline is moved to the lease's renewal.
RENEW_EVERY = 0.2
START_TIMEOUT = 60.0
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class ChildFailed(Exception):
    """A child process that could not start or answered nonsense."""


class Child:
    """One child process and its two pipes."""

    def __init__(self, process: Process, max_line: int) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)
        self._max_line = max_line

    @property
    def pid(self) -> int:
        return self.process.pid

    async def send(self, message: dict[str, Any]) -> None:
        await self._stdin.send((json.dumps(message) + "\n").encode())

    async def receive(self) -> dict[str, Any]:
        """The next reply; `anyio.EndOfStream` (or IncompleteRead) if the child died."""
        line = await self._stdout.receive_until(b"\n", self._max_line)
        message: dict[str, Any] = json.loads(line)
        return message

    async def kill(self) -> int | None:
        """SIGKILL and reap it; its exit status."""
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5):
                await self.process.wait()
            await self.process.aclose()
        return self.process.returncode

    async def exit_status(self) -> int | None:
        """After its pipe closed: how it ended (waits a little for it)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await self.process.wait()
        return await self.kill()


class ChildPool:
    """The worker's sync-task processes, started on demand and reused."""

    def __init__(self, config: WorkerConfig, tasks: dict[str, Task[Any, Any]]) -> None:
        self._config = config
        self._sync = {name: t for name, t in tasks.items() if not t.is_async}
        self._served: set[str] = set()
        self._idle: list[Child] = []
        self._max_line = 8 * config.max_result_bytes + (1 << 20)

    def serves(self, name: str) -> bool:
        """Whether runs of task `name` go to a child process."""
        return name in self._served

    async def start(self) -> None:
        """Start one child, learn which sync tasks it can import, keep it
        ready. Tasks it cannot import run in threads, with a warning."""
        if not self._sync:
            return
        self._served = set(self._sync)
        try:
            child, ready = await self._spawn()
        except Exception as exc:  # any failure to start (a platform without fd passing too)
            self._served = set()
            log.warning(
                "Sync tasks run in threads: their child process failed to start (%s). "
                "A thread cannot be stopped, so such a run can outlive its lease.",
                exc,
            )
            return
        for name, why in sorted(dict(ready.get("missing") or {}).items()):
            log.warning(
                "Sync task %r runs in a thread, not a child process: %s. "
                "A thread cannot be stopped, so its run can outlive its lease.",
                name,
                why,
            )
        self._served = set(ready.get("tasks") or ()) & set(self._sync)
        self._idle.append(child)

    async def aclose(self) -> None:
        """Stop every idle child (a running one is killed by its run's end)."""
        idle, self._idle = self._idle, []
        for child in idle:
            await child.kill()

    async def call(self, held: HeldRun, terms: Callable[[], FeedTerms]) -> Reply | None:
        """Run `held` in a child. Cancelled (a stop request cancels the run's
        scope): the child gets `STOP_GRACE` to return after `cancelled()`
        turned true, unless the lease is lost, then it is killed. None: the
        run stopped, its stop reason decides the report."""
        d = held.delivery
        try:
            child = await self._acquire()
        except (ChildFailed, OSError) as exc:
            log.error("Run %s: no child process to run it in (%s); handing it back", d.id, exc)
            held.stop(StopReason.SHUTDOWN)
            return None
        # Taken now, not before a child was started: that can take a while.
        deadline = terms().hard_deadline(held.last_renewed)
        if time.monotonic() >= deadline:
            self._idle.append(child)
            held.stop(StopReason.LOST)
            return None
        message = {"op": "run", "run_id": str(d.id), "task": d.task, "attempt": d.attempt}
        message |= {"args": d.args, "kwargs": d.kwargs, "deadline": deadline}
        message["max_result_bytes"] = terms().max_result_bytes
        reusable = False
        try:
            await child.send(message)
            reply: dict[str, Any] | None = None
            while reply is None:
                with anyio.move_on_after(RENEW_EVERY):
                    reply = await child.receive()  # cancel-safe: a partial line stays buffered
                if reply is None:
                    deadline = await self._renew(held, child, terms, deadline)
            outcome = _reply_of(reply)
            reusable = True
            return outcome
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                reusable = await self._stop(child, held, terms)
            raise
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, ValueError):
            await self._died(child, held)
            return None
        finally:
            if reusable:
                self._idle.append(child)
            else:
                await child.kill()

    async def _acquire(self) -> Child:
        while self._idle:
            child = self._idle.pop()
            if child.process.returncode is None:
                return child
            await child.kill()
        child, _ = await self._spawn()
        return child

    async def _renew(
        self, held: HeldRun, child: Child, terms: Callable[[], FeedTerms], sent: float
    ) -> float:
        """Move the child's deadline as the lease was renewed; stop the run
        (its scope is cancelled, so the child is killed) once it is past.
        Returns the deadline the child now has."""
        deadline = terms().hard_deadline(held.last_renewed)
        if time.monotonic() >= deadline:
            if held.stop_reason is None:
                log.warning(
                    "Run %s: lease not renewed in time; killing its process", held.delivery.id
                )
            held.stop(StopReason.LOST)
        elif deadline > sent:
            await child.send({"op": "renew", "deadline": deadline})
            return deadline
        return sent

    async def _stop(self, child: Child, held: HeldRun, terms: Callable[[], FeedTerms]) -> bool:
        """After a stop request: True if the child returned in its grace (and
        can be reused), False once it is to be killed."""
        if held.stop_reason in (None, StopReason.LOST):
            return False
        grace = min(STOP_GRACE, terms().hard_deadline(held.last_renewed) - time.monotonic())
        try:
            await child.send({"op": "stop"})
            with anyio.move_on_after(max(0.0, grace)):
                await child.receive()
                return True
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, ValueError):
            pass
        return False

    async def _died(self, child: Child, held: HeldRun) -> None:
        """The child ended mid-run: its watchdog fired (the lease may be
        gone), or the task killed it. Either way the run is left to its
        lease, as for a worker that died: no report, a rescue spent."""
        status = await child.exit_status()
        if status in (WATCHDOG_EXIT, -signal.SIGALRM):
            log.warning("Run %s: its process stopped at the lease deadline", held.delivery.id)
        else:
            log.warning(
                "Run %s: its process %d died (%s); the run is left to its lease",
                held.delivery.id,
                child.pid,
                _describe(status),
            )
        held.stop(StopReason.LOST)

    async def _spawn(self) -> tuple[Child, dict[str, Any]]:
        try:
            out = os.dup(1)  # the task's prints go where ours do
        except OSError:
            out = os.open(os.devnull, os.O_WRONLY)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        try:
            process = await anyio.open_process(
                [sys.executable, "-m", "fastapi_bgtasks.worker.child", str(out)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=env,
                pass_fds=(out,),
                # Out of the worker's process group: a Ctrl-C at a terminal
                # reaches the worker, which drains, not the task mid-run.
                start_new_session=True,
            )
        finally:
            os.close(out)
        child = Child(process, self._max_line)
        try:
            await child.send(self._setup())
            with anyio.fail_after(START_TIMEOUT):
                ready = await child.receive()
        except (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead, ValueError) as exc:
            status = await child.kill()
            raise ChildFailed(f"its process ended ({_describe(status)})") from exc
        except BaseException:
            await child.kill()
            raise
        if ready.get("op") != "ready" or ready.get("error"):
            await child.kill()
            raise ChildFailed(str(ready.get("error") or ready))
        return child, ready

    def _setup(self) -> dict[str, Any]:
        config = self._config
        return {
            "path": list(sys.path),
            "imports": list(config.imports),
            "tasks": [
                {"name": name, "module": t.fn.__module__, "qualname": t.fn.__qualname__}
                for name, t in sorted(self._sync.items())
            ],
            "url": config.url,
            "token": config.token,
            "log_level": logging.getLogger("fastapi_bgtasks.worker").getEffectiveLevel(),
        }


def _reply_of(reply: dict[str, Any]) -> Reply:
    if reply.get("op") != "done":
        raise ValueError(f"unexpected reply {reply!r}")
    error = reply.get("error")
    kind = ReportKind(reply["kind"])
    return kind, reply.get("result"), ErrorInfo.model_validate(error) if error else None


def _describe(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"
