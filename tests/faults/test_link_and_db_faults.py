"""Link and database faults (RELIABILITY.md R4-R7, adapted to DESIGN.md): a
partitioned worker fences itself, PostgreSQL restarts and hangs under load,
two app replicas share one database, and a worker's feed survives a gap.

Feed events are deliveries (there is no claim endpoint); a database the app
cannot reach is a 503 `store_unavailable`; a stale report is the outcome
`stale`. Every scenario ends with the checker (artifacts/faults/<name>.json).
Signals go only to pids these tests started; database faults go to the
private cluster or through a proxy, never to the machine's server.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.faults.checker import ARTIFACTS, TERMINAL, check, history
from tests.faults.pgcluster import PgCluster
from tests.faults.proxy import TcpProxy
from tests.harness.procs import Proc, start_app, start_worker

T = TypeVar("T")


# -- helpers ------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def get_doc(base: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/tasks/runs/{run_id}", timeout=30)
    response.raise_for_status()
    return dict(response.json())


def submit(base: str, task: str, *args: Any) -> str:
    response = httpx.post(f"{base}/tasks/runs", json={"task": task, "args": list(args)}, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def wait_terminal(base: str, run_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}

    def all_done() -> bool:
        for run_id in run_ids:
            if run_id not in docs:
                doc = get_doc(base, run_id)
                if doc["state"] in TERMINAL:
                    docs[run_id] = doc
        return len(docs) == len(run_ids)

    wait_until(all_done, timeout, f"{len(run_ids)} runs to end ({len(docs)} ended)")
    return docs


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def ledger_entry(path: Path, run_id: str, event: str, pid: int) -> dict[str, Any] | None:
    for entry in read_ledger(path):
        if entry["run_id"] == run_id and entry["event"] == event and entry["pid"] == pid:
            return entry
    return None


def worker_id_of(proc: Proc) -> str:
    return proc.wait_for(r"Worker (\S+) connected to").group(1)


def rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value)


def latency_ms(docs: list[dict[str, Any]]) -> dict[str, float]:
    """Queued (created_at) to started (started_at), from the store's clock."""
    values = sorted(
        (rfc3339(d["started_at"]) - rfc3339(d["created_at"])).total_seconds() * 1000
        for d in docs
        if d.get("started_at")
    )
    if not values:
        return {}

    def pct(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 1)

    return {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "max": round(values[-1], 1)}


def is_error_body(response: httpx.Response, code: str) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and body.get("error") == code
        and isinstance(body.get("message"), str)
        and "detail" in body
    )


class DocWatcher(threading.Thread):
    """Polls one run's document and records each distinct (state, attempt,
    worker_id) it sees, with the time: what happened while a link was down."""

    def __init__(self, base: str, run_id: str) -> None:
        super().__init__(daemon=True, name=f"watch {run_id}")
        self.base = base
        self.run_id = run_id
        self.seen: list[tuple[float, str, int, str | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._halt.is_set():
                try:
                    doc = client.get(f"{self.base}/tasks/runs/{self.run_id}").json()
                    key = (doc["state"], doc["attempt"], doc["worker_id"])
                    if not self.seen or self.seen[-1][1:] != key:
                        self.seen.append((time.time(), *key))
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self._halt.wait(0.03)

    def stop(self) -> list[tuple[float, str, int, str | None]]:
        self._halt.set()
        self.join(10)
        return self.seen


@pytest.fixture
def started() -> Iterator[list[Proc]]:
    """Processes a test started (apps and workers); killed by pid afterwards."""
    procs: list[Proc] = []
    yield procs
    for proc in reversed(procs):
        proc.kill()
        proc.stop()


def _worker(url: str, db_url: str, tmp: Path, name: str, *args: str, **kw: Any) -> Proc:
    return start_worker(url, db_url, tmp, *args, name=name, **kw)


# -- R4: a partitioned worker fences itself -----------------------------------


@pytest.mark.timeout(120)
def test_r4_partitioned_worker_self_fences(
    db_url: str, tmp_path: Path, proxies: list[TcpProxy], started: list[Proc]
) -> None:
    """A worker cut off from the app (half-open: no FIN, no RST) stops its run
    before the lease can expire; the app reaps it and another worker completes
    it; after the link heals, the first worker takes new work again."""
    # max_rescues is raised so the half-open feed bug (see the xfail test
    # below) cannot end the run CRASHED before B wins it.
    app, base = start_app(db_url, tmp_path, BGTASKS_TEST_MAX_RESCUES="10")
    started.append(app)
    link = TcpProxy(int(base.rsplit(":", 1)[1]))
    proxies.append(link)
    ledger = tmp_path / "ledger.jsonl"
    a = _worker(
        f"http://127.0.0.1:{link.port}/tasks", db_url, tmp_path, "a", "--prefetch", "0",
        concurrency=1,
    )  # fmt: skip
    started.append(a)
    a_id = worker_id_of(a)

    gate = tmp_path / "gate"
    run_id = submit(base, "gated", str(gate))
    wait_until(lambda: ledger_entry(ledger, run_id, "start", a.pid), 20, "A to start the run")
    wait_until(lambda: get_doc(base, run_id)["state"] == "RUNNING", 20, "RUNNING on A")
    b = _worker(f"{base}/tasks", db_url, tmp_path, "b", "--prefetch", "0", concurrency=1)
    started.append(b)

    watcher = DocWatcher(base, run_id)
    watcher.start()
    fault_at = time.time()
    link.blackhole()
    a_cancelled = wait_until(
        lambda: ledger_entry(ledger, run_id, "cancelled", a.pid), 15, "A to fence its run"
    )
    b_start = wait_until(
        lambda: ledger_entry(ledger, run_id, "start", b.pid), 40, "B to start the run"
    )
    gate.touch()
    doc = wait_terminal(base, [run_id], 20)[run_id]
    seen = watcher.stop()
    link.heal()
    healed_at = time.time()

    assert doc["state"] == "COMPLETED"
    assert doc["worker_id"] != a_id
    assert a_cancelled["t"] < b_start["t"], "A still ran the run when B started it"
    transitions = history(base, run_id)
    assert any(t["reason"] == "worker_lost" for t in transitions)

    # A takes new work after the heal: B leaves, so only A can run these.
    b.stop()
    probes = [submit(base, "sleep_async", 0.05) for _ in range(3)]
    wait_terminal(base, probes, 40)
    probe_pids = {e["pid"] for e in read_ledger(ledger) if e["run_id"] in probes}
    assert probe_pids == {a.pid}
    a_back = max(
        e["t"] for e in read_ledger(ledger) if e["run_id"] in probes and e["event"] == "start"
    )

    figures = check(
        f"r4_partitioned_worker_self_fences_{db_url.split(':', 1)[0].split('+')[0]}",
        base,
        [run_id, *probes],
        [ledger],
        extra={
            "fence_after_fault_s": round(a_cancelled["t"] - fault_at, 3),
            "successor_start_after_fault_s": round(b_start["t"] - fault_at, 3),
            "fence_margin_s": round(b_start["t"] - a_cancelled["t"], 3),
            "claims_on_half_open_feed": len(
                {attempt for _, _, attempt, wid in seen if wid == a_id and attempt > 1}
            ),
            "final_attempt": doc["attempt"],
            "new_work_on_a_after_heal_s": round(a_back - healed_at, 3),
        },
    )
    assert figures["lost"] == 0
    assert figures["duplicate_completions"] == 0
    assert figures["concurrent_overlaps"] == 0


@pytest.mark.timeout(120)
def test_r4_half_open_feed_neither_claims_nor_overlaps(
    tmp_path: Path, proxies: list[TcpProxy], started: list[Proc]
) -> None:
    """While a worker is partitioned, the app leases it nothing more; when the
    link heals, the worker does not start a delivery whose lease is gone."""
    db_url = f"sqlite+aiosqlite:///{tmp_path}/bgtasks.db"
    app, base = start_app(db_url, tmp_path, BGTASKS_TEST_MAX_RESCUES="10")
    started.append(app)
    link = TcpProxy(int(base.rsplit(":", 1)[1]))
    proxies.append(link)
    ledger = tmp_path / "ledger.jsonl"
    a = _worker(
        f"http://127.0.0.1:{link.port}/tasks", db_url, tmp_path, "a", "--prefetch", "0",
        concurrency=1,
    )  # fmt: skip
    started.append(a)
    a_id = worker_id_of(a)
    gate = tmp_path / "gate"
    run_id = submit(base, "gated", str(gate))
    wait_until(lambda: ledger_entry(ledger, run_id, "start", a.pid), 20, "A to start the run")
    wait_until(lambda: get_doc(base, run_id)["state"] == "RUNNING", 20, "RUNNING on A")

    watcher = DocWatcher(base, run_id)
    watcher.start()
    link.blackhole()
    wait_until(lambda: ledger_entry(ledger, run_id, "cancelled", a.pid), 15, "A to fence")
    wait_until(
        lambda: any(t["reason"] == "worker_lost" for t in history(base, run_id)),
        15,
        "the app to reap the run",
    )
    # A healthy worker arrives only now: whatever was leased meanwhile went to A.
    b = _worker(f"{base}/tasks", db_url, tmp_path, "b", "--prefetch", "0", concurrency=1)
    started.append(b)
    b_start = wait_until(
        lambda: ledger_entry(ledger, run_id, "start", b.pid), 40, "B to start the run"
    )
    link.heal()
    # B is busy with the gated run, so this probe can only go to A; the feed is
    # one ordered stream, so once A has run it, A has seen every delivery before.
    probe = submit(base, "sleep_async", 0.05)
    wait_terminal(base, [probe], 40)
    gate.touch()
    doc = wait_terminal(base, [run_id], 30)[run_id]
    seen = watcher.stop()

    a_starts = [
        e for e in read_ledger(ledger) if e["run_id"] == run_id and e["event"] == "start"
        and e["pid"] == a.pid
    ]  # fmt: skip
    zombie_claims = sorted({attempt for _, _, attempt, wid in seen if wid == a_id and attempt > 1})
    figures = check(
        "r4_half_open_feed",
        base,
        [run_id, probe],
        [ledger],
        extra={
            "claims_on_half_open_feed": len(zombie_claims),
            "attempts_leased_to_partitioned_worker": zombie_claims,
            "stale_starts_on_a_after_heal": len(a_starts) - 1,
            "final_state": doc["state"],
            "final_attempt": doc["attempt"],
            "successor_start_t": b_start["t"],
            "seen": [list(s) for s in seen],
        },
    )
    assert figures["lost"] == 0
    assert figures["duplicate_completions"] == 0
    assert not zombie_claims, f"runs leased to the partitioned worker: attempts {zombie_claims}"
    assert figures["concurrent_overlaps"] == 0
    assert doc["state"] == "COMPLETED" and doc["attempt"] == 2


# -- R5: PostgreSQL restarts and hangs under load ------------------------------


class SubmitLoop(threading.Thread):
    """A bounded submit loop: `rate` runs per second until stopped, each with its
    own idempotency key, retried on connection errors and 5xx until acked or
    its budget runs out (then it is indeterminate). Records every answer."""

    def __init__(self, base: str, rate: float, max_runs: int, budget: float) -> None:
        super().__init__(daemon=True, name="submitter")
        self.base = base
        self.rate = rate
        self.max_runs = max_runs
        self.budget = budget
        self.acked: dict[str, str] = {}  # key -> run id
        self.indeterminate: list[str] = []
        self.answers: list[tuple[float, float, str]] = []  # (sent, answered, status)
        self.bad_errors: list[str] = []  # a 5xx without the JSON error body
        self.replayed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        begin = time.monotonic()
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
            for i in range(self.max_runs):
                if self.halt.is_set():
                    return
                due = begin + i / self.rate
                self.halt.wait(max(0.0, due - time.monotonic()))
                self._one(client, f"r5-{i}-{uuid.uuid4().hex[:8]}")

    def _one(self, client: httpx.Client, key: str) -> None:
        deadline = time.monotonic() + self.budget
        body = {"task": "sleep_async", "args": [0.3], "idempotency_key": key}
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                response = client.post(f"{self.base}/tasks/runs", json=body)
            except httpx.TimeoutException:
                self.answers.append((sent, time.monotonic(), "timeout"))
                continue
            except httpx.HTTPError as exc:
                self.answers.append((sent, time.monotonic(), type(exc).__name__))
                time.sleep(0.2)
                continue
            self.answers.append((sent, time.monotonic(), str(response.status_code)))
            if response.status_code == 202:
                self.acked[key] = str(response.json()["id"])
                self.replayed += response.headers.get("Idempotent-Replayed") == "true"
                return
            if response.status_code >= 500:
                if not is_error_body(response, "store_unavailable"):
                    self.bad_errors.append(f"{response.status_code}: {response.text[:300]}")
                time.sleep(0.2)
                continue
            raise AssertionError(f"unexpected answer {response.status_code}: {response.text}")
        self.indeterminate.append(key)


class HealthProbe(threading.Thread):
    """GET /tasks/health every 0.1 s: (sent, answered, status)."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True, name="health")
        self.base = base
        self.answers: list[tuple[float, float, str]] = []
        self.bad_errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.halt.is_set():
                sent = time.monotonic()
                try:
                    response = client.get(f"{self.base}/tasks/health")
                    status = str(response.status_code)
                    if response.status_code != 200 and not is_error_body(
                        response, "store_unavailable"
                    ):
                        self.bad_errors.append(f"{status}: {response.text[:300]}")
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.answers.append((sent, time.monotonic(), status))
                self.halt.wait(0.1)


def _statuses(answers: list[tuple[float, float, str]], start: float, end: float) -> dict[str, int]:
    """Answers to requests in flight at some point of [start, end]."""
    return dict(Counter(s for sent, got, s in answers if got >= start and sent <= end))


def _first_ok_after(answers: list[tuple[float, float, str]], t: float, ok: str) -> float | None:
    times = [got for _, got, s in answers if s == ok and got >= t]
    return round(min(times) - t, 3) if times else None


def _artifact(scenario: str, figures: dict[str, Any]) -> None:
    """What the checker would write, when the checker itself cannot run (the
    app no longer answers GET /runs)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{scenario}.json").write_text(json.dumps(figures, indent=2))


def _docs(base: str, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for run_id in run_ids:
        try:
            docs[run_id] = get_doc(base, run_id)
        except httpx.HTTPError:
            pass
    return docs


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(("fast_restart", "immediate_restart"), id="restarts"),
        pytest.param(("freeze_5s",), id="freeze"),
    ],
)  # fmt: skip
def test_r5_postgres_restart_and_hang_under_load(
    plan: tuple[str, ...],
    private_pg: PgCluster,
    private_db: str,
    tmp_path: Path,
    started: list[Proc],
) -> None:
    """Under a steady submit load (3/s, one idempotency key each) with two
    workers, PostgreSQL restarts (clean, then a crash with WAL recovery) or
    freezes for 5 s: the API answers 503 with the JSON error (never a 500),
    /health says 503 while the database is down, submits succeed again within
    10 s of its return, and every acked run ends, exactly once."""
    app, base = start_app(private_db, tmp_path)
    started.append(app)
    ledger = tmp_path / "ledger.jsonl"
    for name in ("w1", "w2"):
        started.append(_worker(f"{base}/tasks", private_db, tmp_path, name, concurrency=2))

    load = SubmitLoop(base, rate=3.0, max_runs=90, budget=30.0)
    probe = HealthProbe(base)
    problems: list[str] = []
    faults: list[dict[str, Any]] = []

    def soft_wait(predicate: Callable[[], Any], timeout: float, what: str) -> bool:
        try:
            wait_until(predicate, timeout, what)
            return True
        except AssertionError as exc:
            problems.append(str(exc))
            return False

    def more_acked(count: int, what: str) -> bool:
        before = len(load.acked)
        return soft_wait(lambda: len(load.acked) >= before + count, 20, what)

    def inject(name: str) -> bool:
        """One fault; returns whether the app came back (health 200)."""
        start = time.monotonic()
        if name == "freeze_5s":
            private_pg.pause()
            time.sleep(5.0)  # holding the fault, not synchronising
            private_pg.resume()
        else:
            private_pg.restart(name.split("_")[0])
        private_pg.wait_ready()
        back = time.monotonic()
        ok = soft_wait(
            lambda: httpx.get(f"{base}/tasks/health", timeout=5).status_code == 200,
            20,
            f"/health to answer 200 after the {name}",
        )
        end = time.monotonic()
        faults.append(
            {
                "fault": name,
                "db_down_s": round(back - start, 3),
                "health_200_after_db_back_s": round(end - back, 3) if ok else None,
                "submit_statuses_during_outage": _statuses(load.answers, start, end),
                "health_statuses_during_outage": _statuses(probe.answers, start, end),
                "_back": back,
            }
        )
        return ok and more_acked(6, f"submits after the {name}")

    load.start()
    probe.start()
    recovered = True
    try:
        more_acked(6, "the first submits")
        for name in plan:
            recovered = inject(name)
            if not recovered:
                break
    finally:
        private_pg.resume()
        load.halt.set()
        load.join(60)
        probe.halt.set()
        probe.join(15)
    for f in faults:
        f["submit_202_after_db_back_s"] = _first_ok_after(load.answers, f.pop("_back"), "202")

    acked = list(load.acked.values())
    if recovered:  # else the app no longer answers: nothing to wait for
        soft_wait(
            lambda: (
                all(d["state"] in TERMINAL for d in _docs(base, acked).values())
                and len(_docs(base, acked)) == len(acked)
            ),
            45,
            "every acked run to end",
        )
    docs = _docs(base, acked)
    seen = Counter(s for _, _, s in load.answers) + Counter(s for _, _, s in probe.answers)
    extra: dict[str, Any] = {
        "faults": faults,
        "submit_statuses_all": dict(Counter(s for _, _, s in load.answers)),
        "health_statuses_all": dict(Counter(s for _, _, s in probe.answers)),
        "slowest_submit_answer_s": round(
            max((got - sent for sent, got, _ in load.answers), default=0.0), 3
        ),
        "idempotent_replays": load.replayed,
        "stuck_running": sum(d["state"] in ("PENDING", "RUNNING") for d in docs.values()),
        "final_states": dict(Counter(d["state"] for d in docs.values())),
        "error_bodies_not_json": load.bad_errors[:5] + probe.bad_errors[:5],
        "problems": problems,
    }
    scenario = f"r5_postgres_{'_'.join(plan)}_under_load"
    try:
        listed = httpx.get(f"{base}/tasks/runs?limit=500", timeout=30).json()["runs"]
        extra["indeterminate_present"] = len({r["id"] for r in listed} - set(acked))
        figures = check(
            scenario, base, acked, [ledger], indeterminate=len(load.indeterminate), extra=extra
        )
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        figures = {
            "scenario": scenario,
            "checker_error": f"{type(exc).__name__}: {exc}",
            "submitted_acked": len(acked),
            "submitted_indeterminate": len(load.indeterminate),
            "lost": sum(docs.get(r, {}).get("state") not in TERMINAL for r in acked),
            **extra,
        }
        _artifact(scenario, figures)

    assert "500" not in seen, extra
    assert set(seen) <= {"200", "202", "503"}, extra
    assert not load.bad_errors and not probe.bad_errors, extra
    assert not problems, extra
    for f in faults:
        if f["fault"] == "freeze_5s":
            assert f["health_statuses_during_outage"].get("503", 0) >= 1, f
        assert f["submit_202_after_db_back_s"] is not None, f
        assert f["submit_202_after_db_back_s"] <= 10, f
    assert figures["lost"] == 0
    assert figures["duplicate_completions"] == 0
    assert figures["concurrent_overlaps"] == 0
    assert extra["stuck_running"] == 0
    assert not load.indeterminate


# -- R6: two replicas on one database -------------------------------------------


@pytest.mark.timeout(180)
def test_r6_two_replicas_share_one_database(
    private_pg: PgCluster,
    private_db: str,
    tmp_path: Path,
    proxies: list[TcpProxy],
    started: list[Proc],
) -> None:
    """Workers on replica 1 run what replica 2 accepts (LISTEN/NOTIFY); replica
    1 killed and restarted loses no run in flight; replica 2 cut off from the
    database answers 503 and recovers when the link heals."""
    # Leases long enough to outlive replica 1's restart: no reaping is expected.
    knobs = {"BGTASKS_TEST_LEASE": "10", "BGTASKS_TEST_HEARTBEAT": "1"}
    db_link = TcpProxy(private_pg.port)
    proxies.append(db_link)
    via_proxy = private_db.replace(f":{private_pg.port}/", f":{db_link.port}/")
    assert via_proxy != private_db
    r1, base1 = start_app(private_db, tmp_path, name="r1", **knobs)
    started.append(r1)
    r2, base2 = start_app(via_proxy, tmp_path, name="r2", **knobs)
    started.append(r2)
    port1 = int(base1.rsplit(":", 1)[1])
    ledger = tmp_path / "ledger.jsonl"
    # No prefetch: a worker holds no more than it runs, so the three long
    # runs below are all RUNNING at once (one worker cannot hoard them).
    workers = [
        _worker(f"{base1}/tasks", private_db, tmp_path, name, "--prefetch", "0", concurrency=2)
        for name in ("w1", "w2")
    ]
    started.extend(workers)

    # 1. Submitted through replica 2, run by workers that only know replica 1.
    quick = [submit(base2, "sleep_async", 0.05) for _ in range(10)]
    quick_docs = wait_terminal(base2, quick, 30)
    assert {d["state"] for d in quick_docs.values()} == {"COMPLETED"}
    cross_replica = latency_ms(list(quick_docs.values()))

    # 2. SIGKILL replica 1 with runs in flight; start it again on its port.
    long = [submit(base2, "sleep_async", 4.0) for _ in range(3)]
    wait_until(lambda: all(get_doc(base2, r)["state"] == "RUNNING" for r in long), 30, "long runs")
    marks = [len(w.output()) for w in workers]
    killed_at = time.monotonic()
    r1.signal(signal.SIGKILL)
    r1.popen.wait(10)
    r1b, _ = start_app(private_db, tmp_path, port=port1, name="r1b", **knobs)
    started.append(r1b)
    r1_back = time.monotonic() - killed_at
    for worker, mark in zip(workers, marks, strict=True):
        worker.wait_for(r"reconnected to", timeout=30, start=mark)
    reconnected = time.monotonic() - killed_at
    long_docs = wait_terminal(base2, long, 40)
    assert {d["state"] for d in long_docs.values()} == {"COMPLETED"}
    assert {d["attempt"] for d in long_docs.values()} == {1}, "a run in flight was reaped"
    spurious = [r for r in long if any(t["reason"] == "worker_lost" for t in history(base2, r))]
    assert not spurious
    after_restart = [submit(base2, "sleep_async", 0.05) for _ in range(3)]
    wait_terminal(base1, after_restart, 30)

    # 3. Replica 2's database link goes half-open for 5 s.
    during: dict[str, Any] = {}

    def submit_during() -> None:
        sent = time.monotonic()
        try:
            response = httpx.post(
                f"{base2}/tasks/runs",
                json={"task": "sleep_async", "args": [0.05]},
                timeout=httpx.Timeout(40.0, connect=5.0),
            )
            during["status"] = response.status_code
            during["json_error"] = response.status_code < 500 or is_error_body(
                response, "store_unavailable"
            )
            if response.status_code == 202:
                during["id"] = response.json()["id"]
        except httpx.HTTPError as exc:
            during["status"] = type(exc).__name__
        during["seconds"] = round(time.monotonic() - sent, 3)

    health2: list[str] = []
    bad_bodies: list[str] = []
    db_link.blackhole()
    cut_at = time.monotonic()
    side = threading.Thread(target=submit_during, daemon=True)
    side.start()
    # Replica 1 keeps serving while replica 2 cannot reach the database.
    unaffected = submit(base1, "sleep_async", 0.05)
    while time.monotonic() - cut_at < 5.0:  # hold the fault 5 s, probing replica 2
        try:
            response = httpx.get(f"{base2}/tasks/health", timeout=10)
            health2.append(str(response.status_code))
            if response.status_code != 200 and not is_error_body(response, "store_unavailable"):
                bad_bodies.append(response.text[:300])
        except httpx.HTTPError as exc:
            health2.append(type(exc).__name__)
        time.sleep(0.2)
    db_link.heal()
    healed_at = time.monotonic()
    wait_until(
        lambda: httpx.get(f"{base2}/tasks/health", timeout=5).status_code == 200,
        30,
        "replica 2 /health 200 after the heal",
    )
    r2_recovery = time.monotonic() - healed_at
    side.join(60)
    recovered_submit = wait_until(
        lambda: (
            (
                r := httpx.post(
                    f"{base2}/tasks/runs", json={"task": "sleep_async", "args": [0.05]}, timeout=30
                )
            ).status_code
            == 202
            and str(r.json()["id"])
        ),
        10,
        "a submit through replica 2 after the heal",
    )
    final = [unaffected, recovered_submit] + ([during["id"]] if "id" in during else [])
    wait_terminal(base1, final, 30)

    acked = quick + long + after_restart + final
    figures = check(
        "r6_two_replicas_share_one_database",
        base1,
        acked,
        [ledger],
        extra={
            "latency_submit_on_r2_to_started_on_r1_ms": cross_replica,
            "r1_restart_s": round(r1_back, 3),
            "workers_reconnected_after_kill_s": round(reconnected, 3),
            "in_flight_runs_reaped": len(spurious),
            "r2_health_statuses_during_db_blackhole": dict(Counter(health2)),
            "r2_submit_during_db_blackhole": during,
            "r2_health_200_after_heal_s": round(r2_recovery, 3),
            "error_bodies_not_json": bad_bodies[:5],
        },
    )
    assert "503" in health2, health2
    assert set(health2) <= {"200", "503"}, health2
    assert not bad_bodies
    assert during.get("status") in (202, 503) and during.get("json_error"), during
    assert figures["lost"] == 0
    assert figures["duplicate_completions"] == 0
    assert figures["concurrent_overlaps"] == 0


# -- R7: the feed's gap ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_r7_sse_gap_recovery(
    db_url: str, tmp_path: Path, proxies: list[TcpProxy], started: list[Proc]
) -> None:
    """A worker's feed is cut (reset, then a 3 s half-open gap) while 30 runs
    are submitted: after the heal every run runs exactly once, none is leased
    twice."""
    app, base = start_app(db_url, tmp_path)
    started.append(app)
    link = TcpProxy(int(base.rsplit(":", 1)[1]))
    proxies.append(link)
    ledger = tmp_path / "ledger.jsonl"
    worker = _worker(f"http://127.0.0.1:{link.port}/tasks", db_url, tmp_path, "w", concurrency=4)
    started.append(worker)
    warm = submit(base, "sleep_async", 0.01)
    wait_terminal(base, [warm], 20)
    mark = len(worker.output())

    link.blackhole()  # first, so the worker's reconnect hangs too
    link.reset()
    gap_at = time.monotonic()
    ids = [submit(base, "sleep_async", 0.05) for _ in range(30)]
    submitted_in = time.monotonic() - gap_at
    while time.monotonic() - gap_at < 3.0:  # hold the gap 3 s
        time.sleep(0.05)
    queued = Counter(get_doc(base, r)["state"] for r in ids)
    link.heal()
    docs = wait_terminal(base, ids, 40)
    worker.wait_for(r"reconnected to", timeout=10, start=mark)

    assert {d["state"] for d in docs.values()} == {"COMPLETED"}
    assert {d["attempt"] for d in docs.values()} == {1}
    starts = Counter(
        e["run_id"] for e in read_ledger(ledger) if e["event"] == "start" and e["run_id"] in ids
    )
    assert set(starts) == set(ids) and set(starts.values()) == {1}, starts
    leased = {r: sum(t["to_state"] == "PENDING" for t in history(base, r)) for r in ids}
    assert set(leased.values()) == {1}, leased

    figures = check(
        f"r7_sse_gap_recovery_{db_url.split(':', 1)[0].split('+')[0]}",
        base,
        [warm, *ids],
        [ledger],
        extra={
            "gap_s": 3.0,
            "submitted_during_gap": len(ids),
            "submit_seconds": round(submitted_in, 3),
            "states_at_end_of_gap": dict(queued),
            "latency_queued_to_started_ms": latency_ms(list(docs.values())),
            "leased_more_than_once": sum(v > 1 for v in leased.values()),
        },
    )
    assert figures["lost"] == 0
    assert figures["duplicate_completions"] == 0
    assert figures["concurrent_overlaps"] == 0
