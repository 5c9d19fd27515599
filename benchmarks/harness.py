"""What every workload shares: scratch databases, the processes (the app in
uvicorn, workers, client scripts), reading the outcome back from the store,
memory, statistics and a description of the machine.

Every process a repetition starts belongs to one `Bench`, which stops them
and drops its database on exit, so a failed repetition leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import anyio
import anyio.abc
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BGTASKS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PY_SPY = str(Path(sys.executable).parent / "py-spy")
RESULT_PREFIX = "RESULT "
MiB = 1024 * 1024
# After a worker connects: time for its feed's hello and first (empty) claim.
SETTLE_SECONDS = 0.3


@dataclass(frozen=True)
class Sizes:
    """How much each workload does. The defaults are the issue's full sizes;
    QUICK only proves the harness runs (CI, every push)."""

    runs: int = 1_000  # W1, W2, W1c
    submitters: int = 50  # W1c
    pickup_rate: float = 10.0  # W3, submits per second
    pickup_seconds: float = 20.0  # W3
    http_requests: int = 2_000  # W5, per route
    http_warmup: int = 200  # W5, per route
    http_concurrency: int = 10  # W5
    http_client: str = "raw"  # W5: "raw" (asyncio streams) or "httpx"
    map_runs: int = 10_000  # W6
    table_sizes: tuple[int, ...] = (1_000, 100_000, 1_000_000)  # W7
    table_samples: int = 200  # W7, per figure
    raw_rows: int = 3_000  # RAW
    drain_runs: int = 10_000  # DRAIN, the backlog
    memory_requests: int = 20  # MEM, per route


QUICK = Sizes(
    runs=100,
    pickup_seconds=3.0,
    http_requests=200,
    http_warmup=20,
    map_runs=1_000,
    table_sizes=(1_000, 10_000),
    table_samples=50,
    raw_rows=300,
    drain_runs=1_000,
)


@dataclass(frozen=True)
class Context:
    """What every workload function receives besides its backend."""

    sizes: Sizes
    profile: Path | None = None


# -- databases --------------------------------------------------------------


async def pg_admin(sql: str) -> None:
    """One statement on the admin database (CREATE/DROP DATABASE cannot run
    inside a transaction, so no pool and no SQLAlchemy)."""
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Database:
    """A scratch database: a SQLite file in `directory`, or a fresh PostgreSQL
    database on the admin server, dropped by `drop()`."""

    def __init__(self, backend: str, directory: Path) -> None:
        if backend not in ("sqlite", "postgres"):
            raise ValueError(f"unknown backend {backend!r} (sqlite or postgres)")
        self.backend = backend
        self.name: str | None = None
        self.path: Path | None = None  # SQLite's file
        self.dsn = ""  # PostgreSQL's plain (asyncpg) URL
        if backend == "sqlite":
            self.path = directory / "bench.db"
            self.url = f"sqlite+aiosqlite:///{self.path}"
            return
        self.name = f"bgt_bench_{uuid.uuid4().hex[:12]}"
        anyio.run(pg_admin, f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN.rsplit("/", 1)[0]
        self.dsn = f"{base}/{self.name}"
        self.url = self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    def drop(self) -> None:
        if self.name and not os.environ.get("BGTASKS_BENCH_KEEP_DB"):
            anyio.run(pg_admin, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


async def create_schema(url: str) -> None:
    """The library's own schema (tables, indexes, triggers), as the app's
    lifespan would create it: for workloads that run no app."""
    from fastapi_bgtasks.store import Store

    store = Store(url)
    await store.open()
    try:
        await store.migrate()
    finally:
        await store.close()


# -- processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """An ASGI app served by uvicorn in its own process."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tasks_url(self) -> str:
        return f"{self.base}/tasks"


@dataclass
class HeldClient:
    """A client process started by `Bench.held_client`. It prints its result
    and then waits for its stdin to close, so it never exits on its own
    while held: an exit is a failure."""

    process: anyio.abc.Process
    name: str
    log_tail: Callable[[], str]
    _stdout: bytearray = field(default_factory=bytearray)

    def check(self) -> None:
        """Raise, with the processes' log, if the client has exited."""
        if self.process.returncode is not None:
            raise RuntimeError(
                f"client {self.name} exited {self.process.returncode}\n{self.log_tail()}"
            )

    async def result(self, timeout: float = 60) -> dict[str, Any]:
        """The figures it printed (its stdout carries nothing else)."""
        assert self.process.stdout is not None
        with anyio.fail_after(timeout):
            async for chunk in self.process.stdout:
                self._stdout += chunk
                lines = bytes(self._stdout).split(b"\n")[:-1]  # the complete ones
                if any(line.startswith(RESULT_PREFIX.encode()) for line in lines):
                    break
        return parse_result(self._stdout.decode(errors="replace"))


def _prefetch() -> list[str]:
    """Worker prefetch for tuning runs (BGTASKS_BENCH_PREFETCH); the CLI default otherwise."""
    prefetch = os.environ.get("BGTASKS_BENCH_PREFETCH")
    return ["--prefetch", prefetch] if prefetch else []


@dataclass
class Bench:
    """One repetition's world: a temporary directory, a scratch database, one
    log file for every process, and the processes, all gone on exit."""

    backend: str
    profile: Path | None = None
    directory: Path = field(init=False)
    db: Database = field(init=False)
    env: dict[str, str] = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _spies: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _log: IO[bytes] = field(init=False)
    _stack: ExitStack = field(default_factory=ExitStack, init=False)

    def __enter__(self) -> Bench:
        try:
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="bgt-bench-"))
            self.directory = Path(tmp)
            self._log = self._stack.enter_context(open(self.directory / "procs.log", "wb"))
            self.db = Database(self.backend, self.directory)
            self._stack.callback(self.db.drop)
        except BaseException:
            self._stack.close()  # __exit__ never runs for a failed __enter__
            raise
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = dict(os.environ, BGTASKS_DATABASE_URL=self.db.url, PYTHONPATH=path)
        if self.db.dsn:  # where PgQueuer's processes (benchmarks/peer.py) look
            self.env["PGDSN"] = self.db.dsn
        # A URL would send the clients' submits over HTTP instead of to the store.
        self.env.pop("BGTASKS_URL", None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for proc in reversed(self._procs):
                stop(proc)
            for spy in self._spies:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
        finally:
            self._stack.close()

    # -- starting processes ----------------------------------------------

    def spawn(self, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, *args], env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._procs.append(proc)
        return proc

    def start_app(
        self, target: str = "benchmarks.benchapp:app", ready_path: str = "/tasks/health"
    ) -> Server:
        """uvicorn serving `target`; returns once `ready_path` answers 200."""
        port = free_port()
        args = ["-m", "uvicorn", target, "--port", str(port), "--log-level", "warning"]
        proc = self.spawn([*args, "--no-access-log"], self.env)
        server = Server(proc, port)
        deadline = time.monotonic() + 30
        while not _answers(server.base + ready_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{target} did not start\n{self.log_tail()}")
            time.sleep(0.05)
        return server

    def start_worker(
        self,
        server: Server,
        concurrency: int = int(os.environ.get("BGTASKS_BENCH_CONCURRENCY", "10")),
        options: tuple[str, ...] = (),
        *,
        ready: bool = True,
    ) -> subprocess.Popen[bytes]:
        """A worker process for benchtasks' tasks; returns once it holds a
        connection to the app (its feed), plus a moment for the first claim
        (with `ready=False`, as soon as it is started)."""
        env = {k: v for k, v in self.env.items() if k != "BGTASKS_DATABASE_URL"}
        args = ["-m", "fastapi_bgtasks.worker", "benchmarks.benchtasks", "--url", server.tasks_url]
        args += ["--concurrency", str(concurrency), *_prefetch(), *options]
        proc = self.spawn([*args, "--log-level", "WARNING"], env)
        if not ready:
            return proc
        deadline = time.monotonic() + 30
        while not _connected(proc.pid, server.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not connect\n{self.log_tail()}")
            time.sleep(0.05)
        time.sleep(SETTLE_SECONDS)
        return proc

    def spy(self, pid: int, name: str) -> None:
        """py-spy on a running process until it exits, if profiling."""
        if self.profile is None:
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        out = self.profile / f"{name}.txt"
        self._spies.append(
            subprocess.Popen(
                [PY_SPY, "record", "--pid", str(pid), "-r", "200", "-f", "raw", "-o", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _client_command(self, args: Sequence[str], profile_as: str | None) -> list[str]:
        command = [sys.executable, "-m", "benchmarks.clients", *args]
        if self.profile is not None and profile_as is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            out = self.profile / f"{profile_as}.txt"
            command = [PY_SPY, "record", "-r", "200", "-f", "raw", "-o", str(out), "--", *command]
        return command

    def client(self, *args: str, profile_as: str | None = None) -> dict[str, Any]:
        """Run `python -m benchmarks.clients ARGS` to completion and return
        the figures it printed. Under --profile, py-spy records it too."""
        done = subprocess.run(
            self._client_command(args, profile_as),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"client {' '.join(args)} exited {done.returncode}\n{done.stderr[-3000:]}"
            )
        return parse_result(done.stdout)

    @asynccontextmanager
    async def held_client(
        self, *args: str, profile_as: str | None = None
    ) -> AsyncIterator[HeldClient]:
        """`python -m benchmarks.clients --hold ARGS`, kept running (its
        connections open) until the block ends, so what its database
        backends did can be read while they still exist."""
        command = self._client_command(["--hold", *args], profile_as)
        process = await anyio.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            cwd=ROOT, env=self.env,
        )  # fmt: skip
        try:
            yield HeldClient(process, " ".join(args), self.log_tail)
        finally:
            with anyio.CancelScope(shield=True):
                if process.stdin is not None:
                    await process.stdin.aclose()
                with anyio.move_on_after(30) as waited:
                    await process.wait()
                if waited.cancelled_caught:
                    process.kill()
                    await process.wait()

    def check_alive(self) -> None:
        """Raise, with the processes' log, if any process this bench started died."""
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process {proc.args!r} exited {proc.returncode}\n{self.log_tail()}"
                )

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return (self.directory / "procs.log").read_text(errors="replace")[-chars:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the graceful path a deployment uses), then SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _connected(pid: int, port: int) -> bool:
    """Whether process `pid` holds an established TCP connection to `port`."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(
        c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port for c in conns
    )


def parse_result(stdout: str) -> dict[str, Any]:
    """The last `RESULT {json}` line a client printed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            value = json.loads(line[len(RESULT_PREFIX) :])
            if not isinstance(value, dict):
                raise RuntimeError(f"a client printed {value!r}, not an object")
            return value
    raise RuntimeError(f"the client printed no result:\n{stdout[-2000:]}")


def emit(figures: dict[str, Any]) -> None:
    """A client's output: one line the harness finds among any logging."""
    print(RESULT_PREFIX + json.dumps(figures), flush=True)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MiB


# -- the outcome, read back from the store -----------------------------------


def as_datetime(value: Any) -> datetime:
    """SQLite's min()/max() over DATETIME text loses the type."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a time: {value!r}")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def drain_window(
    url: str, task: str, n: int, timeout: float, check: Callable[[], None]
) -> float:
    """Seconds from the first run of `task` created to the last finished,
    once `n` of them have COMPLETED (polled; `check` raises if a process died)."""
    import sqlalchemy as sa

    from fastapi_bgtasks.store import Store, runs

    ours = runs.c.task == task
    store = Store(url)
    await store.open()
    try:
        deadline = time.monotonic() + timeout
        while True:
            async with store.db.read() as conn:
                done = await conn.scalar(
                    sa.select(sa.func.count()).where(ours, runs.c.state == "COMPLETED")
                )
                if done is not None and done >= n:
                    row = (
                        await conn.execute(
                            sa.select(
                                sa.func.min(runs.c.created_at), sa.func.max(runs.c.finished_at)
                            ).where(ours)
                        )
                    ).one()
                    first, last = as_datetime(row[0]), as_datetime(row[1])
                    return (last - first).total_seconds()
            check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {n} {task} runs completed within {timeout}s")
            await anyio.sleep(0.05)
    finally:
        await store.close()


async def results_of(url: str, task: str) -> dict[str, Any]:
    """Every COMPLETED run of `task`: run id (as text) → stored result."""
    import sqlalchemy as sa

    from fastapi_bgtasks.store import Store, runs

    store = Store(url)
    await store.open()
    try:
        async with store.db.read() as conn:
            rows = await conn.execute(
                sa.select(runs.c.id, runs.c.result).where(
                    runs.c.task == task, runs.c.state == "COMPLETED"
                )
            )
            return {str(r.id): r.result for r in rows}
    finally:
        await store.close()


def drain_timeout(n: int) -> float:
    """Generous for a healthy run, short enough that a stuck one fails CI soon."""
    return 30.0 + n / 20


# -- statistics ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float], prefix: str = "") -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        f"{prefix}p50_ms": percentile(ms, 50),
        f"{prefix}p95_ms": percentile(ms, 95),
        f"{prefix}p99_ms": percentile(ms, 99),
        f"{prefix}max_ms": max(ms),
    }


def medians(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure the samples share (flags and
    strings are taken from the first sample)."""
    merged: dict[str, Any] = {}
    for key, value in samples[0].items():
        values = [s.get(key) for s in samples]
        numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numeric) == len(values):
            merged[key] = statistics.median(numeric)
        else:
            merged[key] = value
    return merged


# -- the machine ----------------------------------------------------------------


def machine_info(backends: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on, stored beside them."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": round(psutil.virtual_memory().total / MiB),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": _pg_version() if "postgres" in backends else None,
        "tempdir_filesystem": _filesystem(Path(tempfile.gettempdir())),
        "packages": _versions(),
        "task_map": _has_task_map(),
        "git_head": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _pg_version() -> str | None:
    async def version() -> str:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    try:
        return anyio.run(version)
    except Exception as exc:  # informative only: the workloads report the failure
        return f"unavailable ({type(exc).__name__})"


def _filesystem(path: Path) -> str | None:
    """The file system SQLite's scratch files live on (tmpfs would flatter it)."""
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (
            best is None or len(part.mountpoint) > len(best.mountpoint)
        ):
            best = part
    return f"{best.fstype} on {best.mountpoint}" if best else None


PACKAGES = (
    "fastapi-bgtasks", "fastapi", "starlette", "uvicorn", "sqlalchemy", "asyncpg",
    "aiosqlite", "pydantic", "httpx", "anyio", "uvloop", "pgqueuer",
)  # fmt: skip


def _versions() -> dict[str, str | None]:
    """The installed versions the figures depend on."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _has_task_map() -> bool:
    """W6 is skipped until the library has Task.map."""
    from fastapi_bgtasks import Task

    return hasattr(Task, "map")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()
