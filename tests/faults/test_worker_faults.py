"""Worker faults over real processes (RELIABILITY.md R1, R2, R3, R10, adapted
to DESIGN.md): a worker killed, drained, frozen, or killed by its own task.

Each scenario runs uvicorn serving tests/harness/hostapp.py and worker CLIs,
each worker with its own ledger, then hands the acked runs, the store and the
ledgers to the checker. A lost worker does not spend a retry: its runs come
back as the next attempt, or end CRASHED `WorkerLost` once their rescues are
spent. Timing knobs are tests/timing.py's (lease 2 s, heartbeat 0.4 s).

Executions the ledger leaves open (a killed process, a run a live worker
dropped when it lost its lease) are closed at the time the process died or
logged the drop, so the checker's overlap count means something.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
import asyncpg
import httpx
import pytest

from tests import timing
from tests.faults.checker import (
    TERMINAL,
    check,
    count_overlaps,
    read_ledgers,
    split_frozen,
    write_ledger,
)
from tests.faults.proxy import TcpProxy
from tests.harness.procs import ROOT, Proc, child_env, start_app, start_worker

LEASE = timing.LEASE_SECONDS
# A run held by a dead worker is back within lease + reaper; generous on a busy machine.
RESCUE_DEADLINE = LEASE + timing.REAPER_SECONDS + timing.DEADLINE
# What a worker logs when it drops a run whose lease it lost.
FENCED = re.compile(
    r"Run (?P<id>[0-9a-f-]{36})"
    r"(?: is no longer ours|: lease no longer ours|: lease not renewed|: lease past its deadline)"
)
DROPPED = re.compile(
    r"^(?P<at>\d\d:\d\d:\d\d\.\d{3}) \|.*Task run (?P<id>[0-9a-f-]{36}) - \S+: lease lost",
    re.MULTILINE,
)

T = TypeVar("T")


# -- helpers --------------------------------------------------------------


def wait_until(probe: Callable[[], T | None], what: str, timeout: float = timing.DEADLINE) -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Api:
    """The mounted task API, over one keep-alive client."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=f"{base}/tasks", timeout=30)

    def submit(self, task: str, *args: Any, **options: Any) -> str:
        """POST /runs with an idempotency key, retried on transport errors and 5xx."""
        body = {"task": task, "args": list(args), "kwargs": {}, **options}
        body["idempotency_key"] = uuid.uuid4().hex
        delay = 0.1
        for _ in range(8):
            try:
                response = self.http.post("/runs", json=body)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code < 500:
                assert response.status_code == 202, response.text
                return str(response.json()["id"])
            time.sleep(delay)
            delay *= 2
        raise AssertionError(f"could not submit {task}{args}")

    def doc(self, run_id: str) -> dict[str, Any]:
        response = self.http.get(f"/runs/{run_id}")
        response.raise_for_status()
        return dict(response.json())

    def runs(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        params: dict[str, Any] = {"limit": 500}
        while True:
            page = self._get("/runs", params=params)
            found.update((r["id"], r) for r in page["runs"])
            if not page.get("next_cursor"):
                return found
            params["cursor"] = page["next_cursor"]

    def _get(self, path: str, **kwargs: Any) -> Any:
        """A read, retried while the app answers 5xx (a busy store)."""
        for _ in range(5):
            response = self.http.get(path, **kwargs)
            if response.status_code < 500:
                break
            time.sleep(0.5)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def history(self, run_id: str) -> list[dict[str, Any]]:
        return list(self._get(f"/runs/{run_id}/history")["transitions"])

    def transitions(self, run_id: str) -> list[tuple[str | None, str, int, str | None]]:
        return [
            (t["from_state"], t["to_state"], t["attempt"], t["reason"])
            for t in self.history(run_id)
        ]

    def first(self, run_ids: set[str], reason: str) -> float:
        """Epoch time of the earliest transition with this reason (store clock)."""
        return min(
            datetime.fromisoformat(t["at"].replace("Z", "+00:00")).timestamp()
            for run_id in run_ids
            for t in self.history(run_id)
            if t["reason"] == reason
        )

    def completions(self, run_id: str) -> int:
        return sum(t[1] == "COMPLETED" for t in self.transitions(run_id))

    def wait_terminal(
        self, ids: list[str], timeout: float = timing.DEADLINE
    ) -> dict[str, dict[str, Any]]:
        def probe() -> dict[str, dict[str, Any]] | None:
            runs = self.runs()
            return runs if all(runs.get(i, {}).get("state") in TERMINAL for i in ids) else None

        return wait_until(probe, f"{len(ids)} runs to end", timeout)


def worker_pid(document: dict[str, Any]) -> int | None:
    """The pid part of a `host:pid:random` worker id."""
    worker_id = document.get("worker_id")
    return int(worker_id.rsplit(":", 2)[1]) if worker_id else None


def entries(path: Path) -> list[dict[str, Any]]:
    return read_ledgers([path])


def started(path: Path, run_ids: set[str], attempt: int | None = None) -> set[str]:
    return {
        e["run_id"]
        for e in entries(path)
        if e["event"] == "start"
        and e["run_id"] in run_ids
        and (attempt is None or e["attempt"] == attempt)
    }


def unfinished(path: Path, pid: int) -> set[str]:
    """Runs this process started (ledger) and neither ended nor cancelled."""
    opened: set[tuple[str, int]] = set()
    for e in entries(path):
        if e["pid"] != pid:
            continue
        key = (e["run_id"], e["attempt"])
        if e["event"] == "start":
            opened.add(key)
        else:
            opened.discard(key)
    return {run_id for run_id, _ in opened}


def fenced(proc: Proc) -> set[str]:
    """Runs a worker dropped because their lease was no longer its own."""
    return {m["id"] for m in FENCED.finditer(proc.output())}


def dropped_at(proc: Proc, near: float) -> dict[str, list[float]]:
    """When the worker logged each 'lease lost; result dropped' (its log has
    local times of day; `near` is an epoch time the same day or just before)."""
    day = datetime.fromtimestamp(near).date()
    times: dict[str, list[float]] = {}
    for m in DROPPED.finditer(proc.output()):
        at = datetime.combine(day, datetime.strptime(m["at"], "%H:%M:%S.%f").time())
        if at.timestamp() < near - 3600:  # past midnight
            at += timedelta(days=1)
        times.setdefault(m["id"], []).append(at.timestamp())
    return times


def close_open_starts(
    lines: list[dict[str, Any]], procs: list[Proc], deaths: dict[int, float]
) -> list[dict[str, Any]]:
    """Give every start with no end a `died` time (read by the checker): when
    its process logged dropping it, else when the process died, else now (a
    live process that never said it stopped is assumed to run still)."""
    closed = {(e["run_id"], e["attempt"], e["pid"]) for e in lines if e["event"] != "start"}
    if not lines:
        return lines
    drops = {p.pid: dropped_at(p, min(e["t"] for e in lines)) for p in procs}
    now = time.time()
    out = []
    for e in lines:
        if e["event"] == "start" and (e["run_id"], e["attempt"], e["pid"]) not in closed:
            after = [t for t in drops.get(e["pid"], {}).get(e["run_id"], []) if t >= e["t"] - 0.5]
            e = {**e, "died": min([*after, deaths.get(e["pid"], now)])}
        out.append(e)
    return out


def heartbeat_failures(*procs: Proc) -> int:
    return sum(p.output().count("Heartbeat failed") for p in procs)


def assert_clean(figures: dict[str, Any]) -> None:
    assert figures["lost"] == 0, figures
    assert figures["duplicate_completions"] == 0, figures
    assert figures["concurrent_overlaps"] == 0, figures
    assert figures["unexpected"] == 0, figures


class Cluster:
    """The processes one scenario started; all stopped (thawed first) at the end."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.backend = "postgres" if db_url.startswith("postgresql") else "sqlite"
        self.procs: list[Proc] = []
        self.api: Api | None = None

    def app(self, **env: str) -> Api:
        proc, base = start_app(self.db_url, self.tmp, **env)
        self.procs.append(proc)
        self.api = Api(base)
        return self.api

    def ledger(self, name: str) -> Path:
        return self.tmp / f"ledger-{name}.jsonl"

    def worker(self, name: str, *args: str, concurrency: int = 4, url: str | None = None) -> Proc:
        assert self.api is not None
        proc = start_worker(
            url or f"{self.api.base}/tasks",
            self.db_url,
            self.tmp,
            *args,
            concurrency=concurrency,
            name=name,
            BGTASKS_TEST_LEDGER=str(self.ledger(name)),
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self.api is not None:
            self.api.http.close()
        # Workers first (newest first), the app last.
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.signal(signal.SIGCONT)
            proc.stop(timeout=10)


@pytest.fixture
def cluster(db_url: str, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(db_url, tmp_path)
    try:
        yield made
    finally:
        made.close()


# -- R1: kill -9 a worker mid-run -----------------------------------------

LONG_SECONDS = 6.0


@pytest.mark.timeout(120)
def test_r1_a_worker_killed_mid_run_loses_nothing_and_runs_once_at_a_time(
    cluster: Cluster,
) -> None:
    """Runs in flight on a SIGKILLed worker complete on the survivor as attempt 2."""
    api = cluster.app()
    w1 = cluster.worker("w1")
    w2 = cluster.worker("w2")
    ledgers = {w1.pid: cluster.ledger("w1"), w2.pid: cluster.ledger("w2")}
    longs = [api.submit("sleep_async", LONG_SECONDS) for _ in range(8)]
    shorts = [api.submit("sleep_async", 0.1) for _ in range(30)]

    # 8 long runs on two workers of concurrency 4: one runs at least 4 of them.
    def victim() -> Proc | None:
        return next((w for w in (w1, w2) if len(started(ledgers[w.pid], set(longs))) >= 3), None)

    a = wait_until(victim, "3 long runs started on one worker")
    killed_at = time.time()
    a.signal(signal.SIGKILL)
    a.popen.wait(10)
    b = w2 if a is w1 else w1
    # What the dead worker held: its lease tokens stay in the store until they
    # expire (>= 1.2 s from now); its ledger names the runs it had started.
    held = {
        r
        for r, d in api.runs().items()
        if worker_pid(d) == a.pid and d["state"] in ("PENDING", "RUNNING")
    }
    in_flight = unfinished(ledgers[a.pid], a.pid)
    # Submits go on during the fault.
    shorts += [api.submit("sleep_async", 0.1) for _ in range(30)]
    acked = longs + shorts

    runs = api.wait_terminal(acked, RESCUE_DEADLINE + 2 * LONG_SECONDS)
    assert len(in_flight & set(longs)) >= 3, in_flight
    assert {runs[r]["state"] for r in acked} == {"COMPLETED"}
    assert all(runs[r]["max_attempts"] == 1 for r in acked)
    # A live worker may drop a run itself when its heartbeats time out (a
    # loaded machine): that run is rescued too. Report it; it must not overlap.
    self_fenced = fenced(b) | fenced(a)
    for run_id in in_flight:
        final = runs[run_id]
        lost_attempt = max(e["attempt"] for e in entries(ledgers[a.pid]) if e["run_id"] == run_id)
        assert worker_pid(final) == b.pid, final
        assert final["attempt"] == lost_attempt + 1 or run_id in self_fenced, final
        assert started(ledgers[b.pid], {run_id}, attempt=final["attempt"])
        # The lost attempt is recorded as such, and no retry was spent.
        steps = api.transitions(run_id)
        assert ("RUNNING", "SCHEDULED", lost_attempt, "worker_lost") in steps, steps
    # Only runs the dead worker held (or a live one dropped) ran again. Its
    # feed may outlive it by a moment on a loaded machine (the app has not
    # yet seen the connection close) and lease it a run after `held` was
    # read: such a run never started there, and its history says so.
    explained = held | in_flight | {e["run_id"] for e in entries(ledgers[a.pid])} | self_fenced
    again = {r for r in acked if runs[r]["attempt"] > 1}
    explained |= {
        r
        for r in again - explained
        if ("PENDING", "SCHEDULED", 1, "worker_lost") in api.transitions(r)
    }
    assert again <= explained, again - explained
    assert all(runs[r]["attempt"] <= 2 for r in acked if r not in self_fenced)

    lines = close_open_starts(read_ledgers(list(ledgers.values())), [w1, w2], {a.pid: killed_at})
    rescued = [e for e in lines if e["pid"] == b.pid and e["attempt"] == 2]
    figures = check(
        f"R1_kill9_worker_midrun_{cluster.backend}",
        api.base,
        acked,
        [write_ledger(cluster.tmp / "r1-annotated.jsonl", lines)],
        extra={
            "backend": cluster.backend,
            "in_flight_on_killed_worker": len(in_flight),
            "leased_to_killed_worker": len(held | in_flight),
            "rescued_attempt_2": sum(runs[r]["attempt"] == 2 for r in acked),
            "self_fenced_runs": len(self_fenced),
            "heartbeat_failures": heartbeat_failures(w1, w2),
            "overlaps_all_pairs": count_overlaps(lines),
            "recovery_s": {
                "first_lease_reclaimed": round(api.first(in_flight, "worker_lost") - killed_at, 3),
                # Rescued runs queue behind the survivor's own work.
                "first_rescued_start": round(
                    min(e["t"] for e in rescued if e["event"] == "start") - killed_at, 3
                ),
                "first_rescued_completion": round(
                    min(e["t"] for e in rescued if e["event"] == "end") - killed_at, 3
                ),
            },
        },
    )
    assert_clean(figures)
    assert figures["overlaps_all_pairs"] == 0
    assert len(in_flight) <= figures["re_executions"] <= len(explained)


@pytest.mark.timeout(90)
def test_r1_on_worker_lost_fail_ends_crashed_at_the_first_loss(cluster: Cluster) -> None:
    """`on_worker_lost="fail"`: CRASHED WorkerLost at the first loss, never retried."""
    api = cluster.app()
    a = cluster.worker("a")
    fragile = [api.submit("sleep_async_fail_on_loss", 30.0) for _ in range(2)]
    sturdy = [api.submit("sleep_async", 30.0) for _ in range(2)]
    acked = fragile + sturdy
    wait_until(
        lambda: len(started(cluster.ledger("a"), set(acked))) == 4, "4 runs started on worker a"
    )
    b = cluster.worker("b")
    killed_at = time.time()
    a.signal(signal.SIGKILL)
    a.popen.wait(10)

    # The retrying runs come back on b; the fragile ones end at once.
    wait_until(
        lambda: started(cluster.ledger("b"), set(sturdy)) == set(sturdy),
        "b to restart the retrying runs",
        RESCUE_DEADLINE,
    )
    runs = api.wait_terminal(fragile, RESCUE_DEADLINE)
    for run_id in fragile:
        final = runs[run_id]
        assert final["state"] == "CRASHED", final
        assert final["error"]["type"] == "WorkerLost", final
        assert final["attempt"] == 1, final
        steps = api.transitions(run_id)
        assert [t[1] for t in steps] == ["SCHEDULED", "PENDING", "RUNNING", "CRASHED"], steps
        assert steps[-1] == ("RUNNING", "CRASHED", 1, "worker_lost"), steps
    assert not started(cluster.ledger("b"), set(fragile)), "a fail-on-loss run was retried"
    for run_id in sturdy:
        # As the app sees it (the ledger line is only the worker's view).
        now = wait_until(
            lambda r=run_id: (d := api.doc(r))["state"] == "RUNNING" and d, "b's RUNNING report"
        )
        assert now["attempt"] == 2, now
        assert worker_pid(now) == b.pid, now
        api.http.post(f"/runs/{run_id}/cancel").raise_for_status()
    runs = api.wait_terminal(acked)
    assert {runs[r]["state"] for r in sturdy} == {"CANCELLED"}

    lines = close_open_starts(
        read_ledgers([cluster.ledger("a"), cluster.ledger("b")]), [a, b], {a.pid: killed_at}
    )
    figures = check(
        f"R1_variant_on_worker_lost_fail_{cluster.backend}",
        api.base,
        acked,
        [write_ledger(cluster.tmp / "r1v-annotated.jsonl", lines)],
        extra={
            "backend": cluster.backend,
            "fail_on_loss_crashed_attempt_1": sum(
                runs[r]["state"] == "CRASHED" and runs[r]["attempt"] == 1 for r in fragile
            ),
            "retry_policy_restarted_attempt_2": len(sturdy),
            "overlaps_all_pairs": count_overlaps(lines),
        },
    )
    assert_clean(figures)
    assert figures["failed_terminal"] == {"WorkerLost": 2}


# -- R2: SIGTERM drains ----------------------------------------------------


@pytest.mark.timeout(90)
def test_r2_sigterm_drain_finishes_the_run_without_reassignment(cluster: Cluster) -> None:
    """Within the grace period a draining worker keeps its lease and finishes
    the run itself: attempt 1, nothing handed to the idle worker."""
    api = cluster.app()
    a = cluster.worker("a", "--grace-seconds", "60")
    gate = cluster.tmp / "gate-drain"
    run_id = api.submit("gated", str(gate))
    wait_until(lambda: started(cluster.ledger("a"), {run_id}), "the gated run to start on a")
    b = cluster.worker("b")
    asked_at = time.monotonic()
    a.signal(signal.SIGTERM)
    a.wait_for(r"Received SIGTERM")
    # A draining worker claims nothing: a run submitted now goes to b.
    probe = api.submit("sleep_async", 0.05)
    # Hold the gate shut for 3 leases: the run stays a's, renewed by heartbeats.
    checks = 0
    while time.monotonic() < asked_at + 3 * LEASE:
        now = api.doc(run_id)
        assert now["state"] == "RUNNING" and now["attempt"] == 1, now
        assert worker_pid(now) == a.pid, now
        checks += 1
        time.sleep(0.2)
    assert a.popen.poll() is None, "a exited before its run finished:\n" + a.output()
    gate.touch()
    assert a.popen.wait(30) == 0, a.output()

    final = api.doc(run_id)
    assert final["state"] == "COMPLETED" and final["result"] == "released", final
    assert final["attempt"] == 1 and worker_pid(final) == a.pid, final
    lines = read_ledgers([cluster.ledger("a"), cluster.ledger("b")])
    mine = [(e["pid"], e["event"], e["attempt"]) for e in lines if e["run_id"] == run_id]
    assert mine == [(a.pid, "start", 1), (a.pid, "end", 1)]
    steps = api.transitions(run_id)
    assert not {t[3] for t in steps} & {"worker_lost", "handed_back"}, steps
    assert api.completions(run_id) == 1
    probe_doc = api.wait_terminal([probe])[probe]
    assert probe_doc["state"] == "COMPLETED" and worker_pid(probe_doc) == b.pid, probe_doc
    assert not started(cluster.ledger("a"), {probe})
    figures = check(
        f"R2_sigterm_drain_within_grace_{cluster.backend}",
        api.base,
        [run_id, probe],
        [cluster.ledger("a"), cluster.ledger("b")],
        extra={
            "backend": cluster.backend,
            "held_through_seconds": 3 * LEASE,
            "status_checks_while_draining": checks,
            "worker_exit_code": a.popen.returncode,
            "probe_attempt": probe_doc["attempt"],
            "heartbeat_failures": heartbeat_failures(a, b),
        },
    )
    assert_clean(figures)
    assert figures["re_executions"] == 0


@pytest.mark.timeout(90)
def test_r2_grace_expired_hands_the_run_back_to_another_worker(cluster: Cluster) -> None:
    """Past the grace period the draining worker stops the run and hands it
    back; the other worker runs it as attempt 2, after the first stopped."""
    api = cluster.app()
    a = cluster.worker("a", "--grace-seconds", "0.5")
    gate = cluster.tmp / "gate-handback"
    run_id = api.submit("gated", str(gate))
    wait_until(lambda: started(cluster.ledger("a"), {run_id}), "the gated run to start on a")
    b = cluster.worker("b")
    a.signal(signal.SIGTERM)
    assert a.popen.wait(30) == 0, a.output()
    wait_until(lambda: started(cluster.ledger("b"), {run_id}, attempt=2), "b to start attempt 2")
    gate.touch()
    final = api.wait_terminal([run_id])[run_id]
    assert final["state"] == "COMPLETED" and final["attempt"] == 2, final
    assert worker_pid(final) == b.pid, final
    steps = api.transitions(run_id)
    assert ("RUNNING", "SCHEDULED", 1, "handed_back") in steps, steps
    assert "worker_lost" not in {t[3] for t in steps}, steps
    assert api.completions(run_id) == 1
    lines = read_ledgers([cluster.ledger("a"), cluster.ledger("b")])
    mine = [(e["pid"], e["event"], e["attempt"]) for e in lines if e["run_id"] == run_id]
    assert mine == [
        (a.pid, "start", 1),
        (a.pid, "cancelled", 1),
        (b.pid, "start", 2),
        (b.pid, "end", 2),
    ]
    stopped_at = next(e["t"] for e in lines if e["event"] == "cancelled")
    restarted_at = next(e["t"] for e in lines if e["pid"] == b.pid and e["event"] == "start")
    assert stopped_at <= restarted_at
    figures = check(
        f"R2_sigterm_grace_expired_handback_{cluster.backend}",
        api.base,
        [run_id],
        [cluster.ledger("a"), cluster.ledger("b")],
        extra={
            "backend": cluster.backend,
            "worker_exit_code": a.popen.returncode,
            "recovery_s": {"handed_back_to_restarted": round(restarted_at - stopped_at, 3)},
        },
    )
    assert_clean(figures)
    assert figures["re_executions"] == 1


# -- R3: a frozen worker is fenced -----------------------------------------


@pytest.mark.timeout(120)
def test_r3_a_sigstopped_worker_is_fenced_when_it_wakes(cluster: Cluster) -> None:
    """A worker frozen past its lease loses its runs to another; when it wakes
    its heartbeat and reports are refused as stale and change nothing."""
    api = cluster.app()
    a = cluster.worker("a", "--prefetch", "0", concurrency=2)
    # x's gate is shut again when a wakes: a must stop it on a refused heartbeat.
    # y's gate stays open: a may finish it; its report must be refused as stale.
    gates = {"x": cluster.tmp / "gate-x", "y": cluster.tmp / "gate-y"}
    ids = {name: api.submit("gated", str(path)) for name, path in gates.items()}
    acked = list(ids.values())
    wait_until(lambda: len(started(cluster.ledger("a"), set(acked))) == 2, "2 runs started on a")
    b = cluster.worker("b", "--prefetch", "0", concurrency=2)

    stopped_at = time.time()
    a.signal(signal.SIGSTOP)
    wait_until(
        lambda: started(cluster.ledger("b"), set(acked)) == set(acked),
        "b to take over both runs",
        RESCUE_DEADLINE,
    )
    taken_at = time.time()
    hold = stopped_at + 3 * LEASE - time.time()
    if hold > 0:
        time.sleep(hold)  # keep the fault in place for 3 leases
    for path in gates.values():
        path.touch()
    before = api.wait_terminal(acked)
    for run_id in acked:
        assert before[run_id]["state"] == "COMPLETED", before[run_id]
        assert before[run_id]["attempt"] == 2 and worker_pid(before[run_id]) == b.pid
    histories = {run_id: api.transitions(run_id) for run_id in acked}
    gates["x"].unlink()

    log_mark = len(a.output())
    resumed_at = time.time()
    a.signal(signal.SIGCONT)
    # a notices, for each run, that it is no longer its own.
    for run_id in acked:
        a.wait_for(
            rf"Run {run_id}(?: is no longer ours|: lease|: report refused as stale)",
            start=log_mark,
        )
    wait_until(
        lambda: not unfinished(cluster.ledger("a"), a.pid) & set(acked), "a's executions to stop"
    )
    zombie_log = a.output()[log_mark:]
    after = api.runs()
    for run_id in acked:
        assert after[run_id] == before[run_id], (after[run_id], before[run_id])
        assert api.transitions(run_id) == histories[run_id]
        assert api.completions(run_id) == 1
        assert ("RUNNING", "SCHEDULED", 1, "worker_lost") in histories[run_id]
    x_events = [e["event"] for e in entries(cluster.ledger("a")) if e["run_id"] == ids["x"]]
    assert x_events == ["start", "cancelled"], x_events
    assert a.popen.poll() is None, "the woken worker died:\n" + zombie_log

    raw = read_ledgers([cluster.ledger("a"), cluster.ledger("b")])
    lines = split_frozen(raw, a.pid, stopped_at, resumed_at)
    stale_reports = len(re.findall(r"report refused as stale", zombie_log))
    stop_listed = len(re.findall(r"lease no longer ours|is no longer ours", zombie_log))
    # Timed out unrenewed, or found past its deadline by the step fence on waking.
    self_fenced = len(re.findall(r"lease not renewed|lease past its deadline", zombie_log))
    figures = check(
        f"R3_sigstop_zombie_fenced_{cluster.backend}",
        api.base,
        acked,
        [write_ledger(cluster.tmp / "r3-annotated.jsonl", lines)],
        extra={
            "backend": cluster.backend,
            "frozen_seconds": round(resumed_at - stopped_at, 3),
            "stale_reports_rejected": stale_reports,
            "heartbeat_stop_listed": stop_listed,
            "self_fenced_by_timeout": self_fenced,
            "recovery_s": {
                "first_lease_reclaimed": round(
                    api.first(set(acked), "worker_lost") - stopped_at, 3
                ),
                "both_restarted_on_b": round(taken_at - stopped_at, 3),
            },
            "overlaps_all_pairs": count_overlaps(lines),
            "overlaps_if_frozen_time_counted": count_overlaps(raw),
        },
    )
    assert_clean(figures)
    assert figures["overlaps_all_pairs"] == 0
    assert stale_reports + stop_listed + self_fenced >= 2, zombie_log


@pytest.mark.timeout(90)
def test_r3_a_reaped_run_is_not_leased_back_to_the_frozen_worker(cluster: Cluster) -> None:
    """Once a frozen worker's lease on a run expires, the run waits for a live
    worker: it is not leased again to the silent one, whose feed the app still
    holds open (else each lease expiry spends a rescue and the run can end
    CRASHED while a live worker sits idle)."""
    api = cluster.app()
    a = cluster.worker("a", "--prefetch", "0", concurrency=1)
    gate = cluster.tmp / "gate-zombie-feed"
    run_id = api.submit("gated", str(gate))
    wait_until(lambda: started(cluster.ledger("a"), {run_id}), "the gated run to start on a")
    stopped_at = time.time()
    a.signal(signal.SIGSTOP)
    wait_until(
        lambda: any(t[3] == "worker_lost" for t in api.transitions(run_id)),
        "the frozen worker's lease to be reaped",
        RESCUE_DEADLINE,
    )
    time.sleep(1.0)  # keep only the frozen worker connected a moment longer
    b = cluster.worker("b", "--prefetch", "0", concurrency=1)
    gate.touch()
    try:
        final = api.wait_terminal([run_id], RESCUE_DEADLINE + 4 * LEASE)[run_id]
    finally:
        resumed_at = time.time()
        a.signal(signal.SIGCONT)
    steps = api.transitions(run_id)
    lost = sum(t[3] == "worker_lost" for t in steps)
    raw = read_ledgers([cluster.ledger("a"), cluster.ledger("b")])
    check(
        f"R3_zombie_feed_leases_back_{cluster.backend}",
        api.base,
        [run_id],
        [
            write_ledger(
                cluster.tmp / "r3z-annotated.jsonl",
                split_frozen(raw, a.pid, stopped_at, resumed_at),
            )
        ],
        extra={
            "backend": cluster.backend,
            "final_state": final["state"],
            "final_attempt": final["attempt"],
            "rescues_spent_on_the_frozen_worker": lost,
        },
    )
    assert final["state"] == "COMPLETED", (final, steps)
    assert final["attempt"] == 2 and worker_pid(final) == b.pid, (final, steps)
    assert lost == 1, steps


# -- R3/R4 for side effects: a run never executes beside its successor -----

# Long enough that a run outlives its lease several times over.
TICKING_SECONDS = 12.0
FENCE_LEASE = {"BGTASKS_TEST_LEASE": "3", "BGTASKS_TEST_HEARTBEAT": "0.75"}


def side_effects(path: Path, run_id: str) -> list[float]:
    return sorted(e["t"] for e in entries(path) if e["run_id"] == run_id)


def successor_start(path: Path, run_id: str) -> float | None:
    starts = [e["t"] for e in entries(path) if e["run_id"] == run_id and e["event"] == "start"]
    return min(starts) if starts else None


def close_at_last_effect(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An execution that never ended (its process was stopped) ran at most
    until its last side effect: that is all a successor could collide with."""
    last: dict[tuple[str, int, int], float] = {}
    ended = {(e["run_id"], e["attempt"], e["pid"]) for e in lines if e["event"] == "end"}
    for e in lines:
        key = (e["run_id"], e["attempt"], e["pid"])
        last[key] = max(last.get(key, e["t"]), e["t"])
    return [
        {**e, "died": last[(e["run_id"], e["attempt"], e["pid"])]}
        if e["event"] == "start" and (e["run_id"], e["attempt"], e["pid"]) not in ended
        else e
        for e in lines
    ]


def fence_figures(cluster: Cluster, scenario: str, ids: list[str], **extra: Any) -> dict[str, Any]:
    a, b = cluster.ledger("a"), cluster.ledger("b")
    lines = close_at_last_effect(read_ledgers([a, b]))
    margins = {}
    for run_id in ids:
        after = successor_start(b, run_id)
        assert after is not None, f"b never started {run_id}"
        margins[run_id] = round(after - max(side_effects(a, run_id)), 3)
    figures = check(
        f"{scenario}_{cluster.backend}",
        cluster.api.base if cluster.api else "",
        ids,
        [write_ledger(cluster.tmp / f"{scenario}-annotated.jsonl", lines)],
        extra={
            "backend": cluster.backend,
            "last_effect_to_successor_start_s": margins,
            "overlaps_all_pairs": count_overlaps(lines),
            **extra,
        },
    )
    return figures


@pytest.mark.timeout(150)
def test_sync_runs_of_a_cut_off_worker_stop_before_their_successor_starts(
    cluster: Cluster, proxies: list[TcpProxy]
) -> None:
    """A worker whose link is blackholed (half-open) stops its sync runs,
    which ignore `cancelled()`, before the app can give them to another
    worker: no side effect of its runs is written after the successor
    started them. (A thread could not be stopped: it ticked on for seconds
    beside its successor.)"""
    api = cluster.app(**FENCE_LEASE, BGTASKS_TEST_MAX_RESCUES="10")
    link = TcpProxy(int(api.base.rsplit(":", 1)[1]))
    proxies.append(link)
    a_url = f"http://127.0.0.1:{link.port}/tasks"
    cluster.worker("a", "--prefetch", "0", concurrency=3, url=a_url)
    ids = [api.submit("ticking_sync", TICKING_SECONDS) for _ in range(3)]
    wait_until(lambda: started(cluster.ledger("a"), set(ids)) == set(ids), "3 runs on a")
    cluster.worker("b", "--prefetch", "0", concurrency=3)
    cut_at = time.time()
    link.blackhole()
    wait_until(
        lambda: started(cluster.ledger("b"), set(ids)) == set(ids),
        "b to take over the 3 runs",
        RESCUE_DEADLINE,
    )
    final = api.wait_terminal(ids, TICKING_SECONDS + timing.DEADLINE)
    assert {final[i]["state"] for i in ids} == {"COMPLETED"}, final
    figures = fence_figures(
        cluster,
        "sync_fence_blackhole",
        ids,
        last_effect_after_cut_s=max(
            round(max(side_effects(cluster.ledger("a"), i)) - cut_at, 3) for i in ids
        ),
    )
    assert_clean(figures)
    assert figures["overlaps_all_pairs"] == 0
    assert min(figures["last_effect_to_successor_start_s"].values()) > 0, figures


@pytest.mark.timeout(150)
def test_a_sigstopped_worker_writes_no_side_effect_after_its_successor_started(
    cluster: Cluster,
) -> None:
    """A worker frozen past its lease: its sync runs' processes stop
    themselves at the lease deadline although the worker cannot tell them
    to; its async runs take no further step when it resumes. Nothing either
    kind does lands after the successor started the run."""
    api = cluster.app(**FENCE_LEASE, BGTASKS_TEST_MAX_RESCUES="10")
    a = cluster.worker("a", "--prefetch", "0", concurrency=4)
    sync_ids = [api.submit("ticking_sync", TICKING_SECONDS) for _ in range(2)]
    async_ids = [api.submit("ticking_async", TICKING_SECONDS) for _ in range(2)]
    ids = sync_ids + async_ids
    wait_until(lambda: started(cluster.ledger("a"), set(ids)) == set(ids), "4 runs on a")
    cluster.worker("b", "--prefetch", "0", concurrency=4)
    stopped_at = time.time()
    a.signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: started(cluster.ledger("b"), set(ids)) == set(ids),
            "b to take over the 4 runs",
            RESCUE_DEADLINE,
        )
    finally:
        resumed_at = time.time()
        a.signal(signal.SIGCONT)
    final = api.wait_terminal(ids, TICKING_SECONDS + timing.DEADLINE)
    assert {final[i]["state"] for i in ids} == {"COMPLETED"}, final
    late = [e for e in entries(cluster.ledger("a")) if e["t"] >= resumed_at]
    assert late == [], "side effects after the worker resumed"
    assert a.popen.poll() is None, "the resumed worker died:\n" + a.output()
    figures = fence_figures(
        cluster,
        "sync_fence_sigstop",
        ids,
        frozen_seconds=round(resumed_at - stopped_at, 3),
        effects_after_resume=len(late),
    )
    assert_clean(figures)
    assert figures["overlaps_all_pairs"] == 0


def _claim_as_fake_worker(api: Api, worker_id: str, count: int) -> list[dict[str, Any]]:
    """Open the feed as a worker would and read `count` deliveries off it."""
    deliveries: list[dict[str, Any]] = []
    params = {"task": "add", "slots": count}
    headers = {"X-Worker-Id": worker_id}
    with api.http.stream("GET", "/feed", params=params, headers=headers) as response:
        assert response.status_code == 200, response.read()
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "runs":
                deliveries += json.loads(line.split(":", 1)[1])
                if len(deliveries) >= count:
                    return deliveries
    raise AssertionError(f"the feed closed after {deliveries}")


@pytest.mark.skipif(
    "postgres" not in os.environ.get("BGTASKS_TEST_BACKENDS", "sqlite,postgres"),
    reason="PostgreSQL row locks",
)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.timeout(60)
def test_r1_a_heartbeat_racing_a_report_batch_never_fails(cluster: Cluster) -> None:
    """Seen in R1 on PostgreSQL: a survivor's heartbeat answered 500 (deadlock:
    the batch locked runs in report order, the heartbeat in scan order) while
    its report batch ran, so it fenced off its runs and they ran again. Here
    the interleaving is forced with a row lock held from the test."""
    api = cluster.app(BGTASKS_TEST_LEASE="60")  # no lease expires meanwhile
    ids = [api.submit("add", i, i) for i in range(3)]
    worker_id = f"fake:{os.getpid()}:deadlock"
    tokens = {d["id"]: d["lease_token"] for d in _claim_as_fake_worker(api, worker_id, 3)}
    assert set(tokens) == set(ids)
    dsn = cluster.db_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    with anyio.from_thread.start_blocking_portal() as portal:
        blocker = portal.call(asyncpg.connect, dsn)
        watcher = portal.call(asyncpg.connect, dsn)
        try:
            rows = portal.call(
                watcher.fetch,
                "SELECT id::text AS id FROM bgtasks_runs WHERE id = ANY($1::uuid[]) ORDER BY ctid",
                ids,
            )
            first, second, third = (r["id"] for r in rows)  # the order a scan locks them

            def waiting(statement: str) -> bool:
                return bool(
                    portal.call(
                        watcher.fetchval,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock' AND query LIKE $1",
                        f"%UPDATE bgtasks_runs%SET {statement}%",
                    )
                )

            answers: dict[str, int] = {}

            def post(name: str, path: str, body: dict[str, Any]) -> None:
                with httpx.Client(base_url=f"{api.base}/tasks", timeout=30) as http:
                    answers[name] = http.post(path, json=body).status_code

            def report(run_id: str) -> dict[str, Any]:
                return {"run_id": run_id, "lease_token": tokens[run_id], "state": "RUNNING"}

            portal.call(blocker.execute, "BEGIN")
            portal.call(
                blocker.execute, "SELECT 1 FROM bgtasks_runs WHERE id = $1 FOR UPDATE", third
            )
            # The batch takes `second`, then waits for `third` (held by the test) ...
            reports = threading.Thread(
                target=post,
                args=(
                    "reports",
                    "/worker/reports",
                    {
                        "worker_id": worker_id,
                        "reports": [report(r) for r in (second, third, first)],
                    },
                ),
            )
            reports.start()
            wait_until(lambda: waiting("state"), "the report batch to wait for the row lock")
            # ... the heartbeat takes `first`, then waits for `second` (held by the batch) ...
            beat = threading.Thread(
                target=post,
                args=(
                    "heartbeat",
                    "/worker/heartbeat",
                    {
                        "worker_id": worker_id,
                        "runs": [{"run_id": r, "lease_token": tokens[r]} for r in ids],
                    },
                ),
            )
            beat.start()
            wait_until(lambda: waiting("lease_expires_at"), "the heartbeat to wait for the batch")
            # ... and once `third` is free the batch wants `first`, held by the heartbeat.
            portal.call(blocker.execute, "ROLLBACK")
            reports.join(40)
            beat.join(40)
        finally:
            portal.call(blocker.close)
            portal.call(watcher.close)

    states = {api.doc(r)["state"] for r in ids}
    check(
        f"R1_heartbeat_vs_report_batch_{cluster.backend}",
        api.base,
        [],
        [],
        extra={"backend": cluster.backend, "answers": answers, "states": sorted(states)},
    )
    assert answers == {"reports": 200, "heartbeat": 200}, answers
    assert states == {"RUNNING"}


# -- R10: poison runs ------------------------------------------------------

AS_LIMIT = 512 * 1024 * 1024
POISON = ("exit_hard", "segv", "oom")
POISON_RESCUES = 2  # hostapp: @bg.task(max_rescues=2)


def _limits() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class LimitedWorker(Proc):
    """A worker CLI like start_worker's, under RLIMIT_AS and with no core dumps."""

    def __init__(
        self, api: Api, db_url: str, tmp: Path, name: str, ledger: Path, isolation: str
    ) -> None:
        self.args = [
            sys.executable,
            "-m",
            "fastapi_bgtasks.worker",
            "tests.harness.hostapp",
            "--url",
            f"{api.base}/tasks",
            "--concurrency",
            "4",
            "--prefetch",
            "0",
            "--sync-isolation",
            isolation,
        ]
        self.log = tmp / f"{name}.log"
        self._file = open(self.log, "ab")  # closed by stop()
        env = child_env(db_url, tmp, BGTASKS_TEST_LEDGER=str(ledger))
        del env["BGTASKS_DATABASE_URL"]  # workers hold no database credentials
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            preexec_fn=_limits,
        )


CHILD_DIED = re.compile(
    r"^(?P<at>\d\d:\d\d:\d\d\.\d{3}) \|.*Run (?P<id>[0-9a-f-]{36}): its process (?P<pid>\d+) died",
    re.MULTILINE,
)


def child_deaths(procs: list[Proc], near: float) -> dict[int, float]:
    """When each sync run's child process died, as its worker logged it."""
    day = datetime.fromtimestamp(near).date()
    deaths: dict[int, float] = {}
    for proc in procs:
        for m in CHILD_DIED.finditer(proc.output()):
            at = datetime.combine(day, datetime.strptime(m["at"], "%H:%M:%S.%f").time())
            if at.timestamp() < near - 3600:  # past midnight
                at += timedelta(days=1)
            deaths[int(m["pid"])] = at.timestamp()
    return deaths


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.timeout(150)
def test_r10_poison_runs_are_quarantined(cluster: Cluster, isolation: str) -> None:
    """Runs that kill the process they run in end CRASHED WorkerLost after
    max_rescues + 1 attempts; healthy runs complete. A sync run's child
    process dies, not the worker (process isolation); in a thread it takes
    the worker down, which restarts a bounded number of times."""
    api = cluster.app()
    ledger = cluster.ledger("poison")
    unknown = api.http.post("/runs", json={"task": "no_such_task"})
    assert unknown.status_code == 404, unknown.text

    def spawn(n: int) -> Proc:
        proc = LimitedWorker(
            api, cluster.db_url, cluster.tmp, f"poison-worker-{n}", ledger, isolation
        )
        cluster.procs.append(proc)
        proc.wait_for(r"Worker \S+ connected to")
        return proc

    worker = spawn(0)
    healthy = [api.submit("sleep_async", 0.05) for _ in range(10)]
    poison = {name: api.submit(name) for name in POISON}
    healthy += [api.submit("sleep_async", 0.05) for _ in range(10)]
    acked = healthy + list(poison.values())
    bound = len(POISON) * (POISON_RESCUES + 1)

    # The supervisor: restart the worker whenever it dies, a bounded number of times.
    workers = [worker]
    deaths: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while True:
        runs = api.runs()
        if all(runs.get(r, {}).get("state") in TERMINAL for r in acked):
            break
        assert time.monotonic() < deadline, {r: runs.get(r, {}).get("state") for r in acked}
        if worker.popen.poll() is not None:
            deaths[worker.pid] = time.time()
            assert len(deaths) <= bound, f"crash loop: {[w.popen.returncode for w in workers]}"
            worker = spawn(len(deaths))
            workers.append(worker)
        time.sleep(0.05)

    exits = [w.popen.returncode for w in workers if w.popen.poll() is not None]
    outcome: dict[str, str] = {}
    for name, run_id in poison.items():
        final = runs[run_id]
        steps = api.transitions(run_id)
        if name == "oom" and final["state"] == "FAILED":
            # Under RLIMIT_AS the allocation fails as a MemoryError the task
            # raises: the worker survives and the run fails like any task
            # error (retries=0), which is the contract too.
            assert final["error"]["type"] == "MemoryError", final
            assert final["attempt"] == 1 and "worker_lost" not in {t[3] for t in steps}, steps
            outcome[name] = "FAILED MemoryError, worker survived"
            continue
        assert final["state"] == "CRASHED", (name, final, steps)
        assert final["error"]["type"] == "WorkerLost", (name, final)
        assert final["attempt"] == POISON_RESCUES + 1, (name, final, steps)
        assert sum(t[3] == "worker_lost" for t in steps) == POISON_RESCUES + 1, (name, steps)
        outcome[name] = f"CRASHED WorkerLost after {final['attempt']} attempts"
    assert {runs[r]["state"] for r in healthy} == {"COMPLETED"}
    assert worker.popen.poll() is None, "the last worker died after the poison runs ended"
    # No crash loop: a worker died at most once per attempt of a killing run.
    killing_attempts = sum(
        runs[r]["attempt"] for r in poison.values() if runs[r]["state"] == "CRASHED"
    )
    # No attempt ran twice: a run whose process died is left to its lease,
    # and a re-sent delivery under that lease (a feed reconnect before the
    # app saw the run start) is not run again.
    for name, run_id in poison.items():
        started = sum(w.output().count(f"Received task run: {run_id}") for w in workers)
        assert started <= runs[run_id]["attempt"], (name, started, api.transitions(run_id))
    lines = entries(ledger)
    children: dict[int, float] = {}
    if isolation == "process":
        assert deaths == {}, exits
        children = child_deaths(workers, min(e["t"] for e in lines))
        killed = sum(len(CHILD_DIED.findall(w.output())) for w in workers)
        assert 0 < killed <= killing_attempts, (
            children,
            [m.group(0) for w in workers for m in CHILD_DIED.finditer(w.output())],
            {n: runs[r] for n, r in poison.items()},
        )
    else:
        assert 0 < len(deaths) <= killing_attempts, (deaths, exits)

    lines = close_open_starts(lines, workers, {**deaths, **children})
    figures = check(
        f"R10_poison_runs_quarantined_{isolation}_{cluster.backend}",
        api.base,
        acked,
        [write_ledger(cluster.tmp / "r10-annotated.jsonl", lines)],
        extra={
            "backend": cluster.backend,
            "worker_restarts": len(deaths),
            "child_processes_killed_by_their_run": sum(
                len(CHILD_DIED.findall(w.output())) for w in workers
            ),
            "restart_bound": killing_attempts,
            "worker_exit_codes": exits,
            "poison_outcomes": outcome,
            "healthy_rescued_collateral": sum(runs[r]["attempt"] > 1 for r in healthy),
            "heartbeat_failures": heartbeat_failures(*workers),
            "overlaps_all_pairs": count_overlaps(lines),
        },
    )
    assert_clean(figures)
    crashed = sum(runs[r]["state"] == "CRASHED" for r in poison.values())
    assert figures["failed_terminal"].get("WorkerLost") == crashed >= 2, figures


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_r10_a_run_whose_process_died_is_not_run_again_under_its_lease(
    cluster: Cluster,
) -> None:
    """A fresh delivery starts before the app has its RUNNING report (it
    waits for the report batch). If its process dies and the feed reconnects
    meanwhile, the app re-sends the run, still PENDING under this worker, with
    the same lease: the worker must not run it again. The lease is left to
    expire (a rescue spent), and the next attempt runs under a new lease."""
    # A long report window keeps the run PENDING in the store past the cut.
    api = cluster.app(BGTASKS_TEST_REPORT_INTERVAL="1.5")
    link = TcpProxy(int(api.base.rsplit(":", 1)[1]))
    try:
        worker = cluster.worker(
            "w", "--prefetch", "0", "--sync-isolation", "process",
            url=f"http://127.0.0.1:{link.port}/tasks",
        )  # fmt: skip
        worker.wait_for(r"Worker \S+ connected to")
        run_id = api.submit("exit_hard")
        worker.wait_for(rf"Run {run_id}: its process \d+ died")
        assert api.runs()[run_id]["state"] == "PENDING", api.transitions(run_id)
        link.reset()  # the feed reconnects: the app re-sends what is PENDING under it
        worker.wait_for(r"Worker \S+ reconnected to")
        deadline = time.monotonic() + timing.DEADLINE
        while ("RUNNING", "SCHEDULED", 1, "worker_lost") not in api.transitions(run_id):
            assert time.monotonic() < deadline, api.transitions(run_id)
            time.sleep(0.05)
    finally:
        link.close()
    starts = [
        e for e in entries(cluster.ledger("w")) if e["run_id"] == run_id and e["event"] == "start"
    ]
    assert [e["attempt"] for e in starts if e["attempt"] == 1] == [1], (
        starts,
        api.transitions(run_id),
    )
    assert f"Run {run_id}: re-sent under a lease it gave up" in worker.output()
