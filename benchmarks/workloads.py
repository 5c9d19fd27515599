"""The workloads that run the whole path in separate processes: the app in
uvicorn, workers, and a client process applying the load. Each function runs
one repetition on one backend and returns its figures.

W1, W2, W1c and W6 share one shape (submit from a client, drain with N
workers, read the drain window from the stored times and the cost per run:
probes.submitted); `drain` is our side of DRAIN (a queued backlog, then
one worker: probes.backlog; PgQueuer's side is in peer.py); W3 (pickup
latency), W5 (a route's submit overhead) and MEM (resident memory) have
their own.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import anyio
import httpx

from benchmarks.harness import (
    Bench,
    Context,
    Server,
    drain_timeout,
    drain_window,
    latency_summary,
    results_of,
    rss_mb,
)
from benchmarks.probes import OursProbe, backlog, submitted

# Before the figure "worker RSS idle" is read: the "2 s after start".
IDLE_AFTER_SECONDS = 2.0


def _pipeline(
    backend: str,
    ctx: Context,
    *,
    name: str,
    workers: int,
    task: str,
    runs: int,
    client: list[str],
    worker_options: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Start the app and `workers` workers, let a client submit `runs` runs
    of `task`, wait until all completed; rates from the client's submit time
    and from the stored first created_at to last finished_at, and the cost
    per run (benchmarks/cost.py)."""
    with Bench(backend, ctx.profile) as bench:
        server = bench.start_app()
        started = time.monotonic()
        procs = [bench.start_worker(server, options=worker_options) for _ in range(workers)]
        time.sleep(max(0.0, started + IDLE_AFTER_SECONDS - time.monotonic()))
        idle = rss_mb(procs[0].pid)
        tag = f"{name.lower()}-{backend}"
        bench.spy(server.proc.pid, f"{tag}-app")
        for i, proc in enumerate(procs):
            bench.spy(proc.pid, f"{tag}-worker{i}")
        if ctx.profile is not None:
            time.sleep(1.0)  # py-spy attaches before the load starts
        roots = {server.proc.pid: "app", **{proc.pid: "worker" for proc in procs}}
        figures = anyio.run(
            partial(submitted, profile_as=f"{tag}-submitter"),
            bench,
            OursProbe(bench.db, task),
            roots,
            client,
            runs,
        )
        return {
            **figures,
            "workers": workers,
            "worker_rss_idle_mb": idle,
            "worker_rss_after_mb": rss_mb(procs[0].pid),
            "app_rss_after_mb": rss_mb(server.proc.pid),
        }


def drain(backend: str, ctx: Context, prefetch: int | None = None) -> dict[str, Any]:
    """DRAIN: N runs stored by one `item.map(range(N))` with no worker
    running, then one worker started (`--prefetch`, if given)."""
    n = ctx.sizes.drain_runs
    options = ("--prefetch", str(prefetch)) if prefetch else ()
    with Bench(backend) as bench:
        server = bench.start_app()
        queued = bench.client("map", "--runs", str(n))
        figures = anyio.run(
            backlog,
            bench,
            OursProbe(bench.db, "item"),
            {server.proc.pid: "app"},
            partial(bench.start_worker, server, options=options, ready=False),
            n,
        )
        return {"queue_per_s": n / queued["submit_seconds"], **figures}


def w1(backend: str, ctx: Context) -> dict[str, Any]:
    """N no-op runs submitted one by one by a script; one worker."""
    n = ctx.sizes.runs
    return _pipeline(
        backend,
        ctx,
        name="W1",
        workers=1,
        task="noop",
        runs=n,
        client=["sequential", "--runs", str(n)],
    )


def w2(backend: str, ctx: Context) -> dict[str, Any]:
    """W1 with two workers: does a second worker drain faster, or contend?"""
    n = ctx.sizes.runs
    return _pipeline(
        backend,
        ctx,
        name="W2",
        workers=2,
        task="noop",
        runs=n,
        client=["sequential", "--runs", str(n)],
    )


def w1c(backend: str, ctx: Context) -> dict[str, Any]:
    """W1 with the submits made by 50 coroutines on one loop, as a busy
    service would: what concurrency does to the submit path's pool and locks."""
    n, submitters = ctx.sizes.runs, ctx.sizes.submitters
    figures = _pipeline(
        backend,
        ctx,
        name="W1c",
        workers=1,
        task="noop",
        runs=n,
        client=["concurrent", "--runs", str(n), "--submitters", str(submitters)],
    )
    return {**figures, "submitters": submitters}


def _w8(backend: str, ctx: Context, isolation: str) -> dict[str, Any]:
    n = ctx.sizes.runs
    return _pipeline(
        backend,
        ctx,
        name=f"W8{isolation[0]}",
        workers=1,
        task="item_sync",
        runs=n,
        client=["map", "--runs", str(n), "--sync"],
        worker_options=("--sync-isolation", isolation),
    )


def w8t(backend: str, ctx: Context) -> dict[str, Any]:
    """N sync no-op runs stored at once (one map), drained by one worker
    running them in threads: the per-run cost without process isolation."""
    return _w8(backend, ctx, "thread")


def w8p(backend: str, ctx: Context) -> dict[str, Any]:
    """W8t with the runs in the worker's child processes (the default)."""
    return _w8(backend, ctx, "process")


def w6(backend: str, ctx: Context) -> dict[str, Any]:
    """One `item.map(range(N))` from a script (one INSERT), drained by two workers."""
    from fastapi_bgtasks import Task

    if not hasattr(Task, "map"):
        return {"skipped": "no Task.map"}
    n = ctx.sizes.map_runs
    return _pipeline(
        backend, ctx, name="W6", workers=2, task="item", runs=n, client=["map", "--runs", str(n)]
    )


def w3(backend: str, ctx: Context) -> dict[str, Any]:
    """Pickup latency, submit → task body starts, at a steady rate with one
    idle worker: the wake-up path (NOTIFY or data_version), the claim, the
    feed, and the worker's start confirmation."""
    sizes = ctx.sizes
    with Bench(backend) as bench:
        server = bench.start_app()
        bench.start_worker(server)
        out = bench.client(
            "paced", "--rate", str(sizes.pickup_rate), "--seconds", str(sizes.pickup_seconds)
        )
        sent: dict[str, float] = out["sent"]
        anyio.run(
            drain_window,
            bench.db.url,
            "stamp",
            len(sent),
            drain_timeout(len(sent)),
            bench.check_alive,
        )
        started = anyio.run(results_of, bench.db.url, "stamp")
        latencies = [float(started[run_id]) - at for run_id, at in sent.items()]
        return {
            "runs": len(latencies),
            "rate": out["rate"],
            "behind_max_ms": out["behind_max_ms"],
            **latency_summary(latencies),
        }


def w5(backend: str, ctx: Context) -> dict[str, Any]:
    """What `await submit.delay(noop)` adds to a real route: /submit against
    its twin /baseline, from a load generator at fixed concurrency. No worker:
    the runs accumulate."""
    sizes = ctx.sizes
    with Bench(backend) as bench:
        server = bench.start_app()
        out = bench.client(
            "http",
            "--base", server.base,
            "--paths", "/baseline,/submit",
            "--requests", str(sizes.http_requests),
            "--concurrency", str(sizes.http_concurrency),
            "--warmup", str(sizes.http_warmup),
            "--client", sizes.http_client,
        )  # fmt: skip
        base, submit = out["/baseline"], out["/submit"]
        return {
            "requests": sizes.http_requests,
            "concurrency": sizes.http_concurrency,
            "client": sizes.http_client,
            "baseline_p50_ms": base["p50_ms"],
            "baseline_p99_ms": base["p99_ms"],
            "baseline_per_s": base["requests_per_s"],
            "submit_p50_ms": submit["p50_ms"],
            "submit_p99_ms": submit["p99_ms"],
            "submit_per_s": submit["requests_per_s"],
            "delay_adds_ms": submit["p50_ms"] - base["p50_ms"],
            # At fixed concurrency the p50s include queueing; this is the
            # server time one delay costs, whatever the concurrency.
            "delay_costs_ms": 1000 / submit["requests_per_s"] - 1000 / base["requests_per_s"],
        }


def _poke(server: Server, requests: list[tuple[str, str]], times: int) -> None:
    """A few requests, so the RSS read after them includes whatever the
    first requests load or allocate (routing, validation, the pool)."""
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for _ in range(times):
            for method, path in requests:
                client.request(method, path).raise_for_status()


def memory(backend: str, ctx: Context) -> dict[str, Any]:
    """Resident memory of the app (uvicorn) with the plugin against a bare
    FastAPI app with one route, right after start and after a few requests.
    The worker's own RSS is W1's (idle, and after its runs)."""
    times = ctx.sizes.memory_requests
    with Bench(backend) as bench:
        bare = bench.start_app("benchmarks.bareapp:app", ready_path="/")
        bare_start = rss_mb(bare.proc.pid)
        _poke(bare, [("GET", "/")], times)
        bare_after = rss_mb(bare.proc.pid)
        app = bench.start_app()
        app_start = rss_mb(app.proc.pid)
        routes = [("POST", "/baseline"), ("POST", "/submit"), ("GET", "/tasks/health")]
        _poke(app, routes, times)
        app_after = rss_mb(app.proc.pid)
        return {
            "bare_start_mb": bare_start,
            "bare_after_mb": bare_after,
            "app_start_mb": app_start,
            "app_after_mb": app_after,
            "plugin_adds_mb": app_after - bare_after,
        }
