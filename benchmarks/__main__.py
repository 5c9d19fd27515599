"""The benchmark suite, on SQLite and PostgreSQL.

    python -m benchmarks [--quick] [--workloads W1,W2,...] [--backends sqlite,postgres]
                         [--runs N] [--drain-runs N] [--repeat K]
                         [--table-sizes 1000,100000,...] [--http-client raw|httpx]
                         [--profile DIR] [--output FILE]

Workloads (default: all), each run on each backend, median of --repeat (3):

- W1   N no-op runs (--runs, 1,000) submitted one by one by a script while one
       worker waits: submit/s and drain/s (first created_at to last finished_at),
       and what each run cost: CPU ms (the app, the worker, the submitter's loop,
       PostgreSQL's backends of the bench database), commits and WAL bytes
       (benchmarks/cost.py). W2, W1c, W6 and W8 report the same.
- W2   W1 with two workers.
- W1c  W1 with the N submits made by 50 coroutines on one event loop.
- W3   pickup latency (submit to task body start) at 10 submits/s for 20 s.
- W5   what `await submit.delay(noop)` adds to a route: /submit against /baseline,
       2,000 requests each at concurrency 10, client-side p50/p99 and requests/s.
- W6   `item.map(range(10_000))` from a script, drained by two workers
       (skipped while the library has no Task.map).
- W8t  N sync no-op runs (--runs) stored by one map, drained by one worker
       running them in threads (`--sync-isolation thread`).
- W8p  W8t with the runs in the worker's child processes (the default).
- W7   submit and claim p50 with 1k, 100k and 1M runs already stored.
- MEM  the app's RSS with the plugin against a bare FastAPI app
       (the worker's RSS, idle and after its runs, is in W1's table).
- RAW  raw asyncpg / sqlite3 loops into the same table: the floor.
- W1P  side by side, round by round: the raw single-row INSERT+commit loop,
       our W1, and PgQueuer's W1 (one `Queries.enqueue` per job, one worker).
- DRAIN side by side, round by round: a backlog of --drain-runs (10,000) runs
       queued before one worker starts; drain/s from its first claim to the last
       finished, and the cost per run; ours at defaults and with --prefetch 90,
       PgQueuer at defaults and with batch_size=100 (benchmarks/peer.py).
       PgQueuer's rows are PostgreSQL only. Both tables end with the medians of
       each round's ratios, ours ÷ PgQueuer (and ours ÷ the raw floor).

Prints a table per workload and writes benchmarks/results/latest.json
(--quick: quick.json) with every sample and the machine. Asserts nothing
about speed: --quick runs everything once at tiny sizes to prove the
harness runs (CI). --profile records py-spy profiles of the app, the
workers and the submitter of W1, W2, W1c and W6 into DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import growth, peer, raw, workloads
from benchmarks.harness import QUICK, ROOT, Context, Sizes, machine_info, medians
from benchmarks.report import Column, table, write_json

BACKENDS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    run: Callable[[str, Context], dict[str, Any]]
    columns: Callable[[Sizes], list[Column]]
    # A table of its own (the side-by-side ones), instead of one line per backend.
    render: Callable[[str, Sequence[dict[str, Any]]], str] | None = None


def _throughput_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("runs", "runs"),
        Column("submit_per_s", "submit/s"),
        Column("drain_per_s", "drain/s"),
        Column("cpu_ms_per_run", "CPU ms/run", ".3f"),
        Column("commits_per_run", "commits/run", ".2f"),
        Column("wal_bytes_per_run", "WAL B/run"),
        Column("worker_rss_idle_mb", "worker MB idle", ".1f"),
        Column("worker_rss_after_mb", "worker MB after", ".1f"),
        Column("app_rss_after_mb", "app MB after", ".1f"),
    ]


def _map_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("runs", "runs"),
        Column("submit_per_s", "map runs/s"),
        Column("drain_per_s", "drain/s"),
        Column("cpu_ms_per_run", "CPU ms/run", ".3f"),
    ]


def _pickup_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("runs", "runs"),
        Column("p50_ms", "p50 ms", ".1f"),
        Column("p95_ms", "p95 ms", ".1f"),
        Column("p99_ms", "p99 ms", ".1f"),
        Column("max_ms", "max ms", ".1f"),
        Column("behind_max_ms", "pacer late ms", ".1f"),
    ]


def _route_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("baseline_p50_ms", "baseline p50", ".2f"),
        Column("baseline_p99_ms", "baseline p99", ".2f"),
        Column("baseline_per_s", "baseline req/s"),
        Column("submit_p50_ms", "submit p50", ".2f"),
        Column("submit_p99_ms", "submit p99", ".2f"),
        Column("submit_per_s", "submit req/s"),
        Column("delay_adds_ms", "delay adds ms", ".2f"),
        Column("delay_costs_ms", "server ms/delay", ".2f"),
    ]


def _growth_columns(sizes: Sizes) -> list[Column]:
    labels = [growth.label(s) for s in sorted(sizes.table_sizes)]
    high = labels[-1] + "/" + labels[0]
    return (
        [Column(f"submit_p50_ms_{t}", f"submit ms {t}", ".2f") for t in labels]
        + [Column("submit_ratio", f"submit {high}", ".2f")]
        + [Column(f"claim_p50_ms_{t}", f"claim ms {t}", ".2f") for t in labels]
        + [Column("claim_ratio", f"claim {high}", ".2f")]
        + [Column(f"fill_s_{t}", f"fill s {t}", ".1f") for t in labels]
    )


def _memory_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("bare_start_mb", "bare MB start", ".1f"),
        Column("bare_after_mb", "bare MB after", ".1f"),
        Column("app_start_mb", "app MB start", ".1f"),
        Column("app_after_mb", "app MB after", ".1f"),
        Column("plugin_adds_mb", "plugin adds MB", ".1f"),
    ]


def _no_columns(_sizes: Sizes) -> list[Column]:
    return []


def _raw_columns(_sizes: Sizes) -> list[Column]:
    return [
        Column("rows", "rows"),
        Column("insert_per_s", "insert/s"),
        Column("batch100_rows_per_s", "batch100 rows/s"),
        Column("claims_per_s", "claims/s"),
        Column("insert_default_journal_per_s", "insert/s default journal"),
    ]


WORKLOADS = {
    w.name: w
    for w in [
        Workload("W1", "W1: sequential submits, one worker", workloads.w1, _throughput_columns),
        Workload("W2", "W2: sequential submits, two workers", workloads.w2, _throughput_columns),
        Workload("W1c", "W1c: 50 concurrent submitters", workloads.w1c, _throughput_columns),
        Workload("W3", "W3: pickup latency at a steady rate", workloads.w3, _pickup_columns),
        Workload("W5", "W5: submit inside a route (client-side)", workloads.w5, _route_columns),
        Workload("W6", "W6: bulk map, two workers", workloads.w6, _map_columns),
        Workload("W8t", "W8t: sync runs in threads, one worker", workloads.w8t, _map_columns),
        Workload("W8p", "W8p: sync runs in child processes", workloads.w8p, _map_columns),
        Workload("W7", "W7: cost as the table grows (p50)", growth.w7, _growth_columns),
        Workload("MEM", "MEM: resident memory of the app", workloads.memory, _memory_columns),
        Workload("RAW", "RAW: the drivers alone, same table", raw.raw, _raw_columns),
        Workload("W1P", "W1P: W1 beside PgQueuer and the raw floor, round by round",
                 peer.w1p, _no_columns, peer.render_w1p),
        Workload("DRAIN", "DRAIN: a queued backlog, one worker, beside PgQueuer, round by round",
                 peer.drain, _no_columns, peer.render_drain),
    ]
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, once each: proves the harness runs"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--runs", type=int, help="runs of W1, W2, W1c, W1P (default 1000; quick 100)"
    )
    parser.add_argument(
        "--drain-runs", type=int, help="DRAIN's backlog (default 10000; quick 1000)"
    )
    parser.add_argument("--repeat", type=int, help="repetitions per figure (default 3; quick 1)")
    parser.add_argument(
        "--table-sizes",
        help="W7's table sizes, comma-separated (default 1000,100000,1000000; quick 1000,10000)",
    )
    parser.add_argument(
        "--http-client", choices=["raw", "httpx"], help="W5's load generator (default raw)"
    )
    parser.add_argument(
        "--profile", type=Path, help="record py-spy profiles of each process into this folder"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="where the JSON goes (default benchmarks/results/latest.json; quick: quick.json)",
    )
    return parser


def _selected(spec: str, known: Sequence[str], what: str) -> list[str]:
    """Names from a comma-separated list, matched case-insensitively."""
    by_lower = {k.lower(): k for k in known}
    chosen = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        if name.lower() not in by_lower:
            raise SystemExit(f"unknown {what} {name!r}; choose from {', '.join(known)}")
        chosen.append(by_lower[name.lower()])
    return chosen


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    if args.runs is not None:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    if args.drain_runs is not None:
        sizes = dataclasses.replace(sizes, drain_runs=args.drain_runs)
    if args.table_sizes:
        table_sizes = tuple(sorted({int(s) for s in args.table_sizes.split(",") if s}))
        sizes = dataclasses.replace(sizes, table_sizes=table_sizes)
    if args.http_client is not None:
        sizes = dataclasses.replace(sizes, http_client=args.http_client)
    return sizes


def measure(workload: Workload, backend: str, ctx: Context, repeat: int) -> dict[str, Any]:
    """`repeat` repetitions of one workload on one backend, summarised; a
    failure is recorded (with its traceback) instead of ending the suite."""
    row: dict[str, Any] = {"workload": workload.name, "backend": backend, "repeat": repeat}
    samples: list[dict[str, Any]] = []
    for i in range(repeat):
        print(f"  {workload.name} {backend} {i + 1}/{repeat} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            sample = workload.run(backend, ctx)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
            break
        if "skipped" in sample:
            row["skipped"] = sample["skipped"]
            break
        samples.append({**sample, "seconds": time.monotonic() - started})
    row["samples"] = samples
    if samples and "error" not in row:
        row["median"] = medians(samples)
    return row


def run_suite(
    chosen: Sequence[str],
    backends: Sequence[str],
    ctx: Context,
    *,
    repeat: int,
    quick: bool,
    out: Path,
) -> dict[str, Any]:
    """Every chosen workload on every backend; a table printed as each
    workload ends, and the JSON rewritten then, so a late failure keeps the rest."""
    document: dict[str, Any] = {
        "machine": machine_info(backends),
        "settings": {
            "quick": quick,
            "repeat": repeat,
            "backends": list(backends),
            "workloads": list(chosen),
            "sizes": dataclasses.asdict(ctx.sizes),
        },
        "results": [],
    }
    started = time.monotonic()
    for name in chosen:
        workload = WORKLOADS[name]
        rows = [measure(workload, backend, ctx, repeat) for backend in backends]
        document["results"].extend(rows)
        title = f"{workload.title} (median of {repeat})"
        if workload.render is not None:
            print(workload.render(title, rows))
        else:
            print(table(title, workload.columns(ctx.sizes), rows))
        print(flush=True)
        document["seconds"] = time.monotonic() - started
        write_json(out, document)
    return document


def main() -> int:
    args = _parser().parse_args()
    chosen = _selected(args.workloads, list(WORKLOADS), "workload")
    backends = _selected(args.backends, BACKENDS, "backend")
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    ctx = Context(sizes=_sizes(args), profile=args.profile)
    out = args.output or (
        ROOT / "benchmarks" / "results" / ("quick.json" if args.quick else "latest.json")
    )
    document = run_suite(chosen, backends, ctx, repeat=repeat, quick=args.quick, out=out)
    print(f"{document['seconds']:.0f} s; figures and samples in {out}")
    failed = [row for row in document["results"] if "error" in row]
    for row in failed:
        print(f"\n{row['workload']} on {row['backend']} failed:\n{row['traceback']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
