"""A worker's CPU per run: one worker connected and idle, then N no-op async
runs stored by one map, drained; the worker process's CPU (user + system,
from psutil) over the drain divided by N. The app is always this tree's;
the worker's code can come from another tree, to compare two versions of the
worker on one app, interleaved.

    python -m benchmarks.worker_cpu [--runs 5000] [--rounds 3] [--backend postgres]
        [--prefetch 90] [--tree PATH ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil

from benchmarks.harness import PY_SPY, ROOT, Bench, _connected, drain_timeout, drain_window


def one_round(
    backend: str,
    tree: Path,
    runs: int,
    prefetch: int | None,
    profile: Path | None = None,
    trace: Path | None = None,
) -> dict[str, float]:
    with Bench(backend) as bench:
        server = bench.start_app()
        env = {k: v for k, v in bench.env.items() if k != "BGTASKS_DATABASE_URL"}
        env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT)])
        args = ["-m", "fastapi_bgtasks.worker", "benchmarks.benchtasks", "--url", server.tasks_url]
        if prefetch is not None:
            args += ["--prefetch", str(prefetch)]
        proc = subprocess.Popen(
            [sys.executable, *args, "--log-level", "WARNING"],
            env=env,
            cwd=tree,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        spy: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 30
            while not _connected(proc.pid, server.port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not connect\n{bench.log_tail()}")
                time.sleep(0.05)
            if trace is not None:  # the worker's writes, to count requests and writes
                spy = subprocess.Popen(
                    [
                        *("strace", "-f", "-e", "trace=sendto,write,sendmsg", "-s", "64"),
                        *("-p", str(proc.pid), "-o", str(trace)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            if profile is not None:
                spy = subprocess.Popen(
                    [
                        *(PY_SPY, "record", "--pid", str(proc.pid), "-r", "500"),
                        *("-f", "raw", "-o", str(profile)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            time.sleep(1.0)
            worker = psutil.Process(proc.pid)
            before = worker.cpu_times()
            app_before = psutil.Process(server.proc.pid).cpu_times()
            bench.client("map", "--runs", str(runs))
            window = anyio.run(
                drain_window, bench.db.url, "item", runs, drain_timeout(runs), bench.check_alive
            )
            after = worker.cpu_times()
            app_after = psutil.Process(server.proc.pid).cpu_times()
        finally:
            proc.terminate()
            proc.wait(30)
            if spy is not None:
                spy.wait(30)
        cpu = (after.user + after.system) - (before.user + before.system)
        app_cpu = (app_after.user + app_after.system) - (app_before.user + app_before.system)
        return {
            "worker_ms_per_run": cpu * 1000 / runs,
            "app_ms_per_run": app_cpu * 1000 / runs,
            "drain_per_s": runs / window,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="postgres")
    parser.add_argument("--prefetch", type=int, default=None)
    parser.add_argument("--tree", action="append", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy raw output")
    parser.add_argument("--strace", type=Path, default=None, help="the worker's writes")
    args = parser.parse_args()
    trees: list[Path] = args.tree or [ROOT]
    samples: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            sample = one_round(
                args.backend, tree, args.runs, args.prefetch, args.profile, args.strace
            )
            samples[tree].append(sample)
            print(f"round {r} {tree}: {sample}", flush=True)
    for tree, got in samples.items():
        med = {k: statistics.median(s[k] for s in got) for k in got[0]}
        print(f"median {tree}: " + ", ".join(f"{k}={v:.4g}" for k, v in med.items()), flush=True)


if __name__ == "__main__":
    main()
