"""R12 (RELIABILITY.md): a soak of load waves under a nemesis, over two app
replicas on one database and two workers, on SQLite and PostgreSQL.

Waves of 1, 500 and 2,000 tiny runs, then 200 runs of 50 ms and 8 runs of
1.5 leases (3 s), half async and half sync, repeat for
`BGTASKS_SOAK_SECONDS` (120 s) after one quiet warm-up cycle; after each
wave nothing may be queued or running by its deadline. Meanwhile a seeded
nemesis (`BGTASKS_SOAK_SEED`, printed) SIGKILLs a worker and restarts it
every 20 s, and between kills does one of: SIGSTOP a worker past its lease
then SIGCONT it, blackhole the proxy on a worker's link for 5 s, restart an
app replica, and on PostgreSQL one fast restart of the private cluster
(never the machine's server). A stop or a cut waits until a run is
executing on its worker with 20 ms or more to go, so it lands
mid-execution. `BGTASKS_SOAK_SCALE` scales the waves.

Every execution is in its worker's ledger with monotonic and wall times,
written by the process that executes it: the worker for an async run, the
worker's child process for a sync run. An execution lasts from its start
line to its end (or cancelled) line; with neither, until its process ended:
the worker's SIGKILL for the worker's own pid, for a child the moment a
sampler (`ChildWatch`, every 50 ms) first saw it gone (exited, or a zombie),
else the end of the soak. A SIGSTOPped worker cannot stop itself while
frozen; what it must do is take no step once it resumes. So an async run
on a frozen worker whose only line after its start is its `cancelled`,
written after the resume (its cancellation handler ran, nothing else),
ends at the SIGSTOP; any other line after the resume (an `end`) means it
took a step, and its execution spans the whole freeze. (Its sync runs'
children are not frozen: their lifetimes close them.)

Checked: lost, duplicate completions, unexpected and concurrent overlaps
are 0; re-executions are at most the runs in flight on the workers a fault
hit; the never-restarted replica's RSS and open fds are back within 10 % of
their warm baseline. Throughput and latency percentiles
are printed and written to `<tmp>/R12-soak-report.json` and the checker's
artifact.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests import timing
from tests.faults.checker import (
    all_runs,
    check,
    close_fenced_at_freeze,
    executions,
    overlapping_runs,
    read_ledgers,
    split_frozen,
    write_ledger,
)
from tests.faults.children import ChildWatch
from tests.faults.pgcluster import PgCluster
from tests.faults.proxy import TcpProxy
from tests.faults.test_link_and_db_faults import latency_ms
from tests.harness.procs import Proc, start_app, start_worker

LEASE = timing.LEASE_SECONDS
SOAK_SECONDS = float(os.environ.get("BGTASKS_SOAK_SECONDS", "120"))
SCALE = float(os.environ.get("BGTASKS_SOAK_SCALE", "1"))
# The last wave outlives the lease: a fault that lands on it stops runs
# mid-execution (a sync run's process killed by its watchdog or its worker).
WAVES = [
    (max(1, round(n * SCALE)), s)
    for n, s in ((1, 0.0), (500, 0.0), (2000, 0.0), (200, 0.05), (8, 1.5 * LEASE))
]
KILL_EVERY = 20.0
CUT_SECONDS = 5.0
IDLE_SECONDS = 6.0
AIM_SECONDS = 60.0  # how long a stop or a cut may wait for an execution to hit
LEAK_TOLERANCE = 0.10
CONCURRENCY = 8
BACKENDS = [b for b in os.environ.get("BGTASKS_TEST_BACKENDS", "sqlite,postgres").split(",") if b]
OPEN = ("SCHEDULED", "PENDING", "RUNNING")


def drain_deadline(size: int) -> float:
    return 30.0 + 0.02 * size


def worker_pid(doc: dict[str, Any]) -> int | None:
    """The pid part of a `host:pid:random` worker id."""
    worker_id = doc.get("worker_id")
    return int(worker_id.rsplit(":", 2)[1]) if worker_id else None


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/tasks/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# -- the processes ------------------------------------------------------------


@dataclass
class Incarnation:
    """One worker process of a slot; a killed one is replaced by the next."""

    label: str
    slot: str
    proc: Proc
    ledger: Path
    died: float | None = None  # monotonic


class Fleet:
    """Replicas r1 and r2 on one database; worker w1 talks to r1 directly,
    w2 to r2 through a proxy the nemesis can blackhole."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.lock = threading.Lock()
        self.deaths = threading.Lock()  # held while a worker is killed and replaced
        self.replicas: dict[str, tuple[Proc, str]] = {}
        self.workers: dict[str, Incarnation] = {}
        self.incarnations: list[Incarnation] = []
        self.retired: list[Proc] = []
        self.proxy: TcpProxy | None = None

    def start(self) -> None:
        for name in ("r1", "r2"):
            self.replicas[name] = start_app(
                self.db_url, self.tmp, name=name, BGTASKS_TEST_MAX_RESCUES="10"
            )
        self.proxy = TcpProxy(self.port("r2"))
        self.spawn("w1")
        self.spawn("w2")

    def live_pids(self) -> list[int]:
        """The workers not known to be dead (whose children to watch)."""
        with self.lock:
            return [i.proc.pid for i in self.incarnations if i.died is None]

    def port(self, replica: str) -> int:
        return int(self.replicas[replica][1].rsplit(":", 1)[1])

    def bases(self) -> list[str]:
        with self.lock:
            return [self.replicas["r2"][1], self.replicas["r1"][1]]

    def spawn(self, slot: str) -> Incarnation:
        assert self.proxy is not None
        url = (
            f"{self.replicas['r1'][1]}/tasks"
            if slot == "w1"
            else f"http://127.0.0.1:{self.proxy.port}/tasks"
        )
        label = f"{slot}#{sum(i.slot == slot for i in self.incarnations)}"
        ledger = self.tmp / f"ledger-{label.replace('#', '-')}.jsonl"
        proc = start_worker(
            url,
            self.db_url,
            self.tmp,
            concurrency=CONCURRENCY,
            name=label.replace("#", "-"),
            BGTASKS_TEST_LEDGER=str(ledger),
        )
        born = Incarnation(label, slot, proc, ledger)
        with self.lock:
            self.workers[slot] = born
            self.incarnations.append(born)
        return born

    def restart_replica(self, name: str, landed: Callable[[], None]) -> dict[str, Any]:
        proc = self.replicas[name][0]
        began = time.monotonic()
        code = proc.stop()
        stopped = time.monotonic()
        landed()
        self.retired.append(proc)
        n = sum(p.log.name.startswith(f"{name}-") for p in self.retired)
        fresh = start_app(
            self.db_url, self.tmp, port=self.port(name), name=f"{name}-{n}",
            BGTASKS_TEST_MAX_RESCUES="10",
        )  # fmt: skip
        with self.lock:
            self.replicas[name] = fresh
        return {
            "exit_code": code,
            "stop_s": round(stopped - began, 3),
            "down_s": round(time.monotonic() - began, 3),
        }

    def close(self) -> None:
        for inc in reversed(self.incarnations):
            if inc.proc.popen.poll() is None:
                inc.proc.signal(signal.SIGCONT)
            inc.proc.stop(timeout=10)
        for proc, _ in self.replicas.values():
            proc.stop(timeout=10)
        for proc in self.retired:
            proc.kill()
        if self.proxy is not None:
            self.proxy.close()


class Reader:
    """Reads the API from whichever replica answers."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.http = httpx.Client(timeout=10)

    def get(self, path: str, timeout: float = 30.0, **params: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for base in self.fleet.bases():
                try:
                    response = self.http.get(f"{base}/tasks{path}", params=params)
                    if response.status_code == 200:
                        return response.json()
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no replica answered GET {path} within {timeout:.0f}s")
            time.sleep(0.2)

    def open_runs(self, limit: int = 1) -> list[dict[str, Any]]:
        """Runs still queued or running (up to `limit` of each state)."""
        found: list[dict[str, Any]] = []
        for state in OPEN:
            found += self.get("/runs", state=state, limit=limit)["runs"]
        return found

    def wait_drained(self, timeout: float) -> float | None:
        """Seconds until nothing is queued or running; None past `timeout`."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if not self.open_runs():
                return time.monotonic() - began
            time.sleep(0.1)
        return None


def submit_wave(
    bases: Callable[[], list[str]], specs: list[tuple[str, str, float]], clients: int = 4
) -> tuple[dict[str, str], list[str]]:
    """POST each run with its idempotency key from a few clients at once,
    alternating replicas and retrying on transport errors and 5xx for up to
    60 s. Returns key -> run id (acked) and the keys never acked."""
    acked: dict[str, str] = {}
    indeterminate: list[str] = []

    def one(client: httpx.Client, n: int, spec: tuple[str, str, float]) -> None:
        key, task, seconds = spec
        body = {"task": task, "args": [seconds], "idempotency_key": key}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            urls = bases()
            base = urls[n % len(urls)]
            n += 1
            try:
                response = client.post(f"{base}/tasks/runs", json=body)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if response.status_code == 202:
                acked[key] = str(response.json()["id"])
                return
            if response.status_code < 500:  # refused: reported, never retried
                indeterminate.append(f"{key}: {response.status_code} {response.text[:200]}")
                return
            time.sleep(0.1)
        indeterminate.append(key)

    def share(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(20.0, connect=3.0)) as client:
            for j, spec in enumerate(specs[i::clients]):
                one(client, i + j, spec)

    threads = [threading.Thread(target=share, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return acked, indeterminate


# -- the nemesis --------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    target: str
    begin: float  # monotonic
    end: float
    wall: float
    slots: tuple[str, ...]  # the workers it can make lose runs
    incarnation: str | None = None  # the one process it hit, if one
    detail: dict[str, Any] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # leased to the workers it hit


def plan(rng: random.Random, seconds: float, postgres: bool) -> list[tuple[float, str, str]]:
    """(offset s, kind, target): a kill every 20 s, and one other fault in
    each 20 s slot at a random offset; each kind at least once."""
    required = ["stop", "cut", "replica"] + (["pg"] if postgres else [])
    slots = max(math.ceil(seconds / KILL_EVERY), len(required))
    others = required + [rng.choice(["stop", "cut"]) for _ in range(slots - len(required))]
    rng.shuffle(others)
    events: list[tuple[float, str, str]] = []
    for k in range(slots):
        start = k * KILL_EVERY
        if k:
            events.append((start, "kill", rng.choice(["w1", "w2"])))
        kind = others[k]
        target = {"stop": rng.choice(["w1", "w2"]), "cut": "w2", "replica": "r1", "pg": "pg"}
        events.append((start + rng.uniform(4.0, 11.0), kind, target[kind]))
    events.append((slots * KILL_EVERY, "kill", rng.choice(["w1", "w2"])))
    return events


class LedgerTail:
    """Follows one ledger as it grows: the executions open now, each with
    when it should end (its start plus the run's `seconds`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.open: dict[tuple[str, int, int], float] = {}

    def mid_execution(self, left: float) -> bool:
        """Whether a run is executing with at least `left` seconds to go (a
        no-op run ends before a signal can land)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return False
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            e = json.loads(line)
            key = (e["run_id"], e["attempt"], e["pid"])
            if e["event"] == "start":
                self.open[key] = e["t_mono"] + e.get("seconds", 0.0)
            else:
                self.open.pop(key, None)
        now = time.monotonic()
        return any(end - now >= left for end in self.open.values())


class Nemesis(threading.Thread):
    def __init__(
        self, fleet: Fleet, reader: Reader, rng: random.Random, pg: PgCluster | None
    ) -> None:
        super().__init__(daemon=True, name="nemesis")
        self.fleet = fleet
        self.reader = reader
        self.rng = rng
        self.cluster = pg
        self.schedule = plan(rng, SOAK_SECONDS, pg is not None)
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.halt = threading.Event()
        self.tails: dict[Path, LedgerTail] = {}

    def run(self) -> None:
        began = time.monotonic()
        for offset, kind, target in self.schedule:
            if self.halt.wait(max(0.0, began + offset - time.monotonic())):
                return
            try:
                self.faults.append(self.inject(kind, target))
            except Exception as exc:  # recorded, asserted by the test
                self.problems.append(f"{kind} {target}: {type(exc).__name__}: {exc}")

    def inject(self, kind: str, target: str) -> Fault:
        """One fault. Records the runs leased to the workers it hits before
        it, and again the moment it has landed (a run may have finished
        there with its report unsent, and will run again)."""
        slots = {"kill": (target,), "stop": (target,), "cut": ("w2",), "replica": ("w1",)}
        pids = {self.fleet.workers[s].proc.pid for s in slots.get(kind, ("w1", "w2"))}
        held = self.held_by(pids)

        def landed() -> None:
            held.update(self.held_by(pids))

        aimed = None
        if kind in ("stop", "cut"):
            aimed = self.wait_executing(target, AIM_SECONDS)
        fault: Fault = getattr(self, f"do_{kind}")(target, landed)
        fault.held = held
        if aimed is not None:
            fault.detail["landed_mid_execution"] = aimed
        return fault

    def held_by(self, pids: set[int]) -> set[str]:
        runs: list[dict[str, Any]] = []
        for state in ("PENDING", "RUNNING"):
            runs += self.reader.get("/runs", state=state, limit=500)["runs"]
        return {r["id"] for r in runs if worker_pid(r) in pids}

    def wait_executing(self, slot: str, timeout: float) -> bool:
        """Wait (bounded) until the slot's worker is executing a run with
        20 ms to go, as its ledger shows, so that a stop or a cut lands
        mid-execution."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ledger = self.fleet.workers[slot].ledger
            if self.tails.setdefault(ledger, LedgerTail(ledger)).mid_execution(0.02):
                return True
            time.sleep(0.002)
        return False

    def do_kill(self, slot: str, landed: Callable[[], None]) -> Fault:
        with self.fleet.deaths:
            victim = self.fleet.workers[slot]
            wall, began = time.time(), time.monotonic()
            victim.proc.signal(signal.SIGKILL)
            victim.proc.popen.wait(10)
            victim.died = time.monotonic()
            landed()  # its leases stay until they expire
            fresh = self.fleet.spawn(slot)
        detail = {"pid": victim.proc.pid, "restarted_as": fresh.proc.pid}
        return Fault("kill", slot, began, victim.died, wall, (slot,), victim.label, detail)

    def do_stop(self, slot: str, landed: Callable[[], None]) -> Fault:
        victim = self.fleet.workers[slot]
        hold = LEASE * self.rng.uniform(1.5, 2.5)
        wall, began = time.time(), time.monotonic()
        victim.proc.signal(signal.SIGSTOP)
        landed()
        time.sleep(max(0.0, began + hold - time.monotonic()))  # past the lease
        end = time.monotonic()  # before SIGCONT: whatever it logs next, it did awake
        victim.proc.signal(signal.SIGCONT)
        detail = {"pid": victim.proc.pid, "frozen_s": round(end - began, 3)}
        return Fault("stop", slot, began, end, wall, (slot,), victim.label, detail)

    def do_cut(self, slot: str, landed: Callable[[], None]) -> Fault:
        assert self.fleet.proxy is not None
        wall, began = time.time(), time.monotonic()
        self.fleet.proxy.blackhole()
        landed()
        time.sleep(max(0.0, began + CUT_SECONDS - time.monotonic()))  # holding the fault
        self.fleet.proxy.heal()
        return Fault("cut", slot, began, time.monotonic(), wall, (slot,))

    def do_replica(self, name: str, landed: Callable[[], None]) -> Fault:
        wall, began = time.time(), time.monotonic()
        detail = self.fleet.restart_replica(name, landed)
        return Fault("replica", name, began, time.monotonic(), wall, ("w1",), detail=detail)

    def do_pg(self, _: str, landed: Callable[[], None]) -> Fault:
        assert self.cluster is not None
        wall, began = time.time(), time.monotonic()
        self.cluster.restart("fast")
        self.cluster.wait_ready()
        back = time.monotonic()
        for base in self.fleet.bases():
            deadline = time.monotonic() + 30
            while not healthy(base):
                assert time.monotonic() < deadline, f"{base} unhealthy after the restart"
                time.sleep(0.1)
        landed()  # (not while the database is down: the API cannot answer)
        detail = {"db_down_s": round(back - began, 3)}
        return Fault("pg", "pg", began, time.monotonic(), wall, ("w1", "w2"), detail=detail)


# -- what happened ------------------------------------------------------------


def annotated(
    fleet: Fleet, watch: ChildWatch, now: float
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every ledger line on the monotonic clock, its pid tagged with its
    worker incarnation; an execution with no end closes when its process
    ended: a worker's own pid when it was killed (or now, if it still
    runs), a child's (a sync run) when the child was first seen gone (or
    now). Returns the lines and counts of open executions: in a child the
    watch closed, and in a child it never saw (closed as the worker's, the
    longer)."""
    lines: list[dict[str, Any]] = []
    counts = {"child_executions_closed_by_the_watch": 0, "child_executions_unseen": 0}
    for inc in fleet.incarnations:
        raw = read_ledgers([inc.ledger])
        ended = ("end", "cancelled")
        closed = {(e["run_id"], e["attempt"], e["pid"]) for e in raw if e["event"] in ended}
        for e in raw:
            line = {
                "run_id": e["run_id"],
                "attempt": e["attempt"],
                "pid": f"{inc.label}:{e['pid']}",
                "event": e["event"],
                "t": e["t_mono"],
                "t_wall": e["t"],
            }
            if e["event"] == "start" and (e["run_id"], e["attempt"], e["pid"]) not in closed:
                died = inc.died if inc.died is not None else now
                if e["pid"] != inc.proc.pid:
                    life = watch.life_of(e["pid"], e["t"])
                    if life is None:
                        counts["child_executions_unseen"] += 1
                    else:
                        counts["child_executions_closed_by_the_watch"] += 1
                        died = life.gone if life.gone is not None else now
                line["died"] = died
            lines.append(line)
    return lines, counts


def in_flight(fault: Fault, spans: dict[str, list[tuple[float, float, Any]]]) -> set[str]:
    """Runs executing on a worker the fault hit at some time during it, or
    leased to it when it began or ended."""

    def hit(pid: str) -> bool:
        label = pid.split(":", 1)[0]
        if fault.incarnation is not None:
            return label == fault.incarnation
        return label.split("#", 1)[0] in fault.slots

    executing = {
        run_id
        for run_id, runs in spans.items()
        for start, end, pid in runs
        if hit(pid) and start <= fault.end and end >= fault.begin
    }
    return executing | fault.held


def frozen_time_excluded(lines: list[dict[str, Any]], faults: list[Fault]) -> list[dict[str, Any]]:
    """The ledger as if a frozen worker's executions paused while it was
    stopped, whatever they did after the resume (a diagnostic; the verdict
    is `fenced_at_freeze`'s)."""
    renamed: dict[str, str] = {}  # a worker frozen twice: its lines after the first
    for f in faults:
        if f.kind == "stop":  # the worker only: its children were not frozen
            pid = f"{f.incarnation}:{f.detail['pid']}"
            lines = split_frozen(lines, renamed.get(pid, pid), f.begin, f.end)
            renamed[pid] = f"{renamed.get(pid, pid)}-resumed"
    return lines


def fenced_at_freeze(
    lines: list[dict[str, Any]], faults: list[Fault]
) -> tuple[list[dict[str, Any]], int]:
    """Each frozen worker's async runs that took no step after it resumed
    (their only line after the start is their `cancelled`) end at the
    SIGSTOP (`close_fenced_at_freeze`). Its sync runs execute in children,
    which were not frozen: their lifetimes close them."""
    fenced = 0
    previous: dict[str, float] = {}  # a worker frozen twice: the end of its first freeze
    for f in sorted((f for f in faults if f.kind == "stop"), key=lambda f: f.begin):
        pid = f"{f.incarnation}:{f.detail['pid']}"
        since = previous.get(pid, float("-inf"))
        lines, closed = close_fenced_at_freeze(lines, pid, f.begin, f.end, since)
        previous[pid] = f.end
        fenced += closed
    return lines, fenced


def footprint(proc: Proc) -> dict[str, Any]:
    """RSS and open fds, and the process's TCP connections by remote port."""
    process = psutil.Process(proc.pid)
    peers = Counter(
        str(c.raddr.port) if c.raddr else f"listen:{c.laddr.port}"
        for c in process.net_connections("tcp")
    )
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        kinds[target.split(":", 1)[0] if ":" in target else Path(target).name] += 1
    return {
        "rss_mb": round(process.memory_info().rss / 2**20, 1),
        "fds": process.num_fds(),
        "fds_by_kind": dict(sorted(kinds.items())),
        "tcp_by_peer_port": dict(sorted(peers.items())),
    }


def fill_pools(base: str, requests: int = 24) -> None:
    """Reads enough at once that the app's database pools open every
    connection they keep idle (SQLite readers 4, PostgreSQL `pool_size`):
    done before both measurements, so a pool's size is not taken for a leak."""

    def read(_: int) -> None:
        with httpx.Client(timeout=30) as client:
            client.get(f"{base}/tasks/runs", params={"limit": 500}).raise_for_status()

    with ThreadPoolExecutor(requests) as pool:
        list(pool.map(read, range(requests)))


def settled_footprint(
    proc: Proc, baseline: dict[str, Any], timeout: float = 20.0
) -> dict[str, Any]:
    """The footprint once back within tolerance of `baseline`, or the last one
    seen after `timeout` (closing connections can take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        now = footprint(proc)
        ok = all(now[k] <= baseline[k] * (1 + LEAK_TOLERANCE) for k in ("rss_mb", "fds"))
        if ok or time.monotonic() > deadline:
            return {**now, "within_tolerance": ok}
        time.sleep(0.5)


# -- the scenario ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def soak_db(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, PgCluster | None]:
    """SQLite (one file, two replicas), or a database on the private
    PostgreSQL cluster, which the nemesis may restart."""
    if request.param not in BACKENDS:
        pytest.skip(f"{request.param} not in BGTASKS_TEST_BACKENDS")
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/bgtasks.db", None
    return request.getfixturevalue("private_db"), request.getfixturevalue("private_pg")


class Soak:
    """The waves, their figures, and the fleet they run on."""

    def __init__(self, fleet: Fleet, reader: Reader) -> None:
        self.fleet = fleet
        self.reader = reader
        self.waves: list[dict[str, Any]] = []
        self.acked: dict[str, str] = {}
        self.indeterminate: list[str] = []
        self.problems: list[str] = []
        self.sequence = 0

    def wave(self, cycle: int, size: int, seconds: float) -> bool:
        """Submit one wave and wait for the drain; False if it did not drain."""
        specs = []
        for _ in range(size):
            self.sequence += 1
            task = "sleep_async" if self.sequence % 2 else "sleep_sync"
            specs.append((f"soak-{uuid.uuid4().hex}", task, seconds))
        began = time.monotonic()
        acked, indeterminate = submit_wave(self.fleet.bases, specs)
        submitted = time.monotonic()
        drained = self.reader.wait_drained(drain_deadline(size))
        end = time.monotonic()
        self.acked.update(acked)
        self.indeterminate += indeterminate
        self.waves.append(
            {
                "cycle": cycle,
                "size": size,
                "task_seconds": seconds,
                "acked": len(acked),
                "indeterminate": len(indeterminate),
                "submit_s": round(submitted - began, 3),
                "drained_s": round(end - began, 3) if drained is not None else None,
                "throughput_runs_per_s": round(len(acked) / (end - began), 1),
                "_span": (began, end),
                "_ids": list(acked.values()),
            }
        )
        if drained is None:
            stuck = self.reader.open_runs(limit=20)
            self.problems.append(
                f"cycle {cycle} wave {size}: still open after {drain_deadline(size):.0f}s: "
                f"{[(r['id'], r['state'], r['attempt']) for r in stuck[:20]]}"
            )
            return False
        return True

    def cycle(self, cycle: int, stop: Callable[[], bool]) -> bool:
        for size, seconds in WAVES:
            if stop() or not self.wave(cycle, size, seconds):
                return False
        return True

    def check_workers(self) -> None:
        """A worker that died without the nemesis is a problem; replace it."""
        with self.fleet.deaths:
            for slot, inc in list(self.fleet.workers.items()):
                if inc.proc.popen.poll() is not None and inc.died is None:
                    inc.died = time.monotonic()
                    code = inc.proc.popen.returncode
                    self.problems.append(f"{inc.label} exited {code} by itself")
                    self.fleet.spawn(slot)


def overlap_detail(
    overlaps: dict[str, int],
    lines: list[dict[str, Any]],
    spans: dict[str, list[tuple[float, float, Any]]],
    docs: dict[str, dict[str, Any]],
    faults: list[Fault],
    origin: float,
) -> list[dict[str, Any]]:
    """The first overlapping runs: their executions and the faults they met
    (times in seconds from the start of the soak)."""
    found = []
    for run_id in sorted(overlaps)[:10]:
        runs = sorted(spans[run_id])
        first, last = runs[0][0], max(end for _, end, _ in runs)
        found.append(
            {
                "run_id": run_id,
                "task": docs.get(run_id, {}).get("task"),
                "executions": [
                    [pid, round(start - origin, 3), round(end - origin, 3)]
                    for start, end, pid in runs
                ],
                "ledger": [
                    [e["pid"], e["event"], round(e["t"] - origin, 3)]
                    + [f"{k} {round(e[k] - origin, 3)}" for k in ("died", "until") if k in e]
                    for e in lines
                    if e["run_id"] == run_id
                ],
                "faults": [
                    [f.kind, f.target, round(f.begin - origin, 3), round(f.end - origin, 3)]
                    for f in faults
                    if f.begin <= last and f.end >= first - LEASE
                ],
            }
        )
    return found


def log_counts(fleet: Fleet) -> dict[str, int]:
    text = "".join(inc.proc.output() for inc in fleet.incarnations)
    return {
        "stale_reports_rejected": text.count("refused as stale"),
        "heartbeat_failures": text.count("Heartbeat failed"),
        "self_fenced": text.count("lease not renewed"),
        "results_dropped_lease_lost": text.count("lease lost; result dropped"),
    }


def wave_figures(
    soak: Soak, docs: dict[str, dict[str, Any]], faults: list[Fault]
) -> dict[str, dict[str, float]]:
    """Each wave's faults and latency percentiles; returns the latency of
    the warm-up cycle and of the cycles under the nemesis."""
    buckets: dict[str, list[dict[str, Any]]] = {"normal": [], "under_nemesis": []}
    for w in soak.waves:
        began, end = w.pop("_span")
        mine = [docs[r] for r in w.pop("_ids") if r in docs]
        w["faults"] = [f.kind for f in faults if f.begin <= end and f.end >= began]
        w["latency_queued_to_started_ms"] = latency_ms(mine)
        buckets["normal" if w["cycle"] == 0 else "under_nemesis"] += mine
    return {name: latency_ms(mine) for name, mine in buckets.items()}


def fault_figures(
    faults: list[Fault], spans: dict[str, list[tuple[float, float, Any]]], origin: float
) -> tuple[list[dict[str, Any]], set[str]]:
    rows, hit = [], set()
    for f in faults:
        runs = in_flight(f, spans)
        hit |= runs
        rows.append(
            {
                "kind": f.kind,
                "target": f.target,
                "at_s": round(f.begin - origin, 1),
                "held_s": round(f.end - f.begin, 2),
                "in_flight": len(runs),
                "re_executed": sum(len(spans[r]) > 1 for r in runs),
                **f.detail,
            }
        )
    return rows, hit


def summary_table(report: dict[str, Any]) -> str:
    lines = [
        f"R12 soak on {report['backend']}, seed {report['seed']}, "
        f"{report['soak_s']:.0f} s, {report['figures']['submitted_acked']} runs",
        "cycle  size  drained s  runs/s  p50 ms  p95 ms  p99 ms  max ms  faults",
    ]
    for w in report["waves"]:
        lat = w["latency_queued_to_started_ms"]
        lines.append(
            f"{w['cycle']:>5}  {w['size']:>4}  {w['drained_s']!s:>9}  "
            f"{w['throughput_runs_per_s']:>6}  {lat.get('p50', '-')!s:>6}  "
            f"{lat.get('p95', '-')!s:>6}  {lat.get('p99', '-')!s:>6}  {lat.get('max', '-')!s:>6}  "
            f"{','.join(w['faults'])}"
        )
    for f in report["faults"]:
        lines.append(
            f"  {f['at_s']:>6} s  {f['kind']:<7} {f['target']:<3} held {f['held_s']:>5} s  "
            f"in flight {f['in_flight']:>3}  re-executed {f['re_executed']:>3}"
        )
    keys = (
        "lost", "duplicate_completions", "unexpected", "concurrent_overlaps",
        "overlaps_all_pairs", "overlaps_by_task", "overlaps_frozen_time_excluded",
        "overlaps_if_fenced_runs_ran_through_the_freeze", "async_runs_fenced_at_the_freeze",
        "child_executions_closed_by_the_watch", "child_executions_unseen",
        "re_executions", "re_execution_bound", "stale_reports_rejected",
    )  # fmt: skip
    lines.append("  ".join(f"{k}={report['figures'].get(k)}" for k in keys))
    lines.append(f"leaks: {report['leaks']}")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 330)
def test_soak_waves_with_nemesis(soak_db: tuple[str, PgCluster | None], tmp_path: Path) -> None:
    """Waves of runs drain after each wave under a seeded nemesis; no run is
    lost, completed twice or executed twice at once (a frozen worker's run
    counts as executing while it is frozen unless it took no step after the
    resume); re-executions stay within the
    runs the faults hit; the app's memory and fds come back."""
    db_url, pg = soak_db
    backend = "postgres" if pg else "sqlite"
    seed = int(os.environ.get("BGTASKS_SOAK_SEED") or random.SystemRandom().randrange(2**31))
    print(f"\nR12 soak on {backend}: seed {seed} (set BGTASKS_SOAK_SEED={seed} to replay)")
    fleet = Fleet(db_url, tmp_path)
    watch = ChildWatch(fleet.live_pids)
    nemesis: Nemesis | None = None
    try:
        fleet.start()
        watch.start()
        reader = Reader(fleet)
        soak = Soak(fleet, reader)
        nemesis = Nemesis(fleet, Reader(fleet), random.Random(seed), pg)
        print("nemesis plan:", [(round(t, 1), k, x) for t, k, x in nemesis.schedule])
        origin = time.monotonic()
        soak.cycle(0, lambda: False)  # warm-up, no faults: the normal figures
        r2 = fleet.replicas["r2"][0]
        fill_pools(fleet.replicas["r2"][1])
        time.sleep(IDLE_SECONDS)  # idle keep-alive connections close (httpx: 5 s)
        baseline = footprint(r2)
        nemesis.start()
        soak_end = time.monotonic() + SOAK_SECONDS

        def done() -> bool:
            return bool(soak.problems) or (time.monotonic() > soak_end and not nemesis.is_alive())

        cycle = 1
        while not done():
            soak.cycle(cycle, done)
            soak.check_workers()
            cycle += 1
        nemesis.halt.set()
        nemesis.join(120)
        nemesis.reader.http.close()
        final = reader.wait_drained(60)
        fill_pools(fleet.replicas["r2"][1])
        time.sleep(IDLE_SECONDS)
        soak_s = time.monotonic() - origin
        leaks = {
            "r2_baseline": baseline,
            "r2_after": settled_footprint(r2, baseline),
            "r1_after_its_restart": footprint(fleet.replicas["r1"][0]),
            "database_port": pg.port if pg else None,
        }

        now = time.monotonic()
        watch.halt.set()
        watch.join(10)
        raw, children = annotated(fleet, watch, now)
        lines, fenced = fenced_at_freeze(raw, nemesis.faults)
        base = fleet.bases()[0]
        docs = {r["id"]: r for r in all_runs(base)}
        spans = executions(lines)
        overlaps = overlapping_runs(lines)
        whole_freeze = overlapping_runs(raw)
        excluded = overlapping_runs(frozen_time_excluded(raw, nemesis.faults))
        faults, hit = fault_figures(nemesis.faults, spans, origin)
        latency = wave_figures(soak, docs, nemesis.faults)
        again = {r for r, runs in spans.items() if len(runs) > 1}
        acked = list(soak.acked.values())
        figures = check(
            f"R12_soak_waves_with_nemesis_{backend}",
            base,
            acked,
            [write_ledger(tmp_path / "r12-annotated.jsonl", lines)],
            indeterminate=len(soak.indeterminate),
            extra={
                "backend": backend,
                "seed": seed,
                "final_states": dict(Counter(docs[r]["state"] for r in acked if r in docs)),
                "overlaps_all_pairs": sum(overlaps.values()),
                "overlaps_by_task": dict(Counter(docs[r]["task"] for r in overlaps)),
                "overlaps_frozen_time_excluded": sum(excluded.values()),
                "overlaps_if_fenced_runs_ran_through_the_freeze": sum(whole_freeze.values()),
                "async_runs_fenced_at_the_freeze": fenced,
                **children,
                "child_watch_longest_gap_s": round(watch.longest_gap, 3),
                "overlap_ids": sorted(overlaps)[:20],
                "overlap_detail": overlap_detail(
                    overlaps, lines, spans, docs, nemesis.faults, origin
                ),
                "re_execution_bound": sum(f["in_flight"] for f in faults),
                "re_executions_not_hit_by_a_fault": sorted(again - hit)[:20],
                "still_open_after_final_drain_s": None if final is not None else 60,
                **log_counts(fleet),
            },
        )
        report: dict[str, Any] = {
            "backend": backend,
            "seed": seed,
            "soak_s": round(soak_s, 1),
            "waves_config": WAVES,
            "schedule": nemesis.schedule,
            "faults": faults,
            "waves": soak.waves,
            "latency_queued_to_started_ms": latency,
            "leaks": leaks,
            "figures": figures,
            "problems": soak.problems + nemesis.problems,
        }
        (tmp_path / "R12-soak-report.json").write_text(json.dumps(report, indent=2))
        print(summary_table(report))
        print(f"report: {tmp_path / 'R12-soak-report.json'}")
    finally:
        if nemesis is not None:
            nemesis.halt.set()
            nemesis.join(60)
        watch.halt.set()
        fleet.close()

    violations: list[str] = list(report["problems"])
    if figures["submitted_indeterminate"]:
        violations.append(f"{figures['submitted_indeterminate']} submits never acked")
    if final is None:
        violations.append("runs still open 60 s after the last wave")
    for key in ("lost", "duplicate_completions", "unexpected"):
        if figures[key]:
            violations.append(f"{key} = {figures[key]}")
    if set(figures["final_states"]) != {"COMPLETED"}:
        violations.append(f"final states {figures['final_states']}")
    if figures["re_executions"] > figures["re_execution_bound"]:
        violations.append(
            f"re-executions {figures['re_executions']} > in flight at the faults "
            f"{figures['re_execution_bound']}"
        )
    if not leaks["r2_after"]["within_tolerance"]:
        violations.append(f"r2 footprint {leaks['r2_after']} vs baseline {baseline}")
    if figures["concurrent_overlaps"] or figures["overlaps_all_pairs"]:
        violations.append(
            f"overlapping executions: {figures['overlaps_all_pairs']} pairs "
            f"({figures['overlaps_by_task']}; {figures['overlaps_frozen_time_excluded']} "
            f"if a frozen worker's time were not counted), e.g. {figures['overlap_ids'][:5]}"
        )
    assert not violations, "\n".join(violations)
