"""The worker CLI: import the user's modules, find the hub, serve its tasks.

    python -m fastapi_bgtasks.worker MODULE[:ATTR] [MODULE ...] --url URL
        [--token TOKEN] [--concurrency N] [--prefetch N] [--task NAME ...]
        [--sync-isolation process|thread]

`BGTASKS_URL` and `BGTASKS_TOKEN` fill in missing flags.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from typing import Any

import anyio

from ..errors import AccessDenied, BgTasksError
from ..tasks import Task, TaskRegistry
from .runtime import WorkerConfig, configure_logging, run_worker

log = logging.getLogger("fastapi_bgtasks.worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastapi_bgtasks.worker",
        description="Run fastapi_bgtasks tasks delivered by a mounted task API.",
    )
    parser.add_argument(
        "modules",
        nargs="+",
        metavar="MODULE[:ATTR]",
        help="modules that register tasks; ATTR may name the hub (BgTasks) or a task",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("BGTASKS_URL"),
        help="URL of the mounted task API, e.g. http://127.0.0.1:8000/tasks "
        "(default: $BGTASKS_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("BGTASKS_TOKEN"),
        help="worker bearer token (default: $BGTASKS_TOKEN)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=10, help="runs executed at once (default: 10)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="runs held ready beyond --concurrency (default: 4 x concurrency)",
    )
    parser.add_argument(
        "--task",
        action="append",
        dest="tasks",
        metavar="NAME",
        help="serve only this task (repeatable; default: every registered task)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long running runs may finish (default: 30)",
    )
    parser.add_argument(
        "--sync-isolation",
        choices=["process", "thread"],
        default="process",
        help="where sync tasks run: a child process the worker stops before its lease can "
        "expire (default), or a thread (starts faster; cannot be stopped, so a run that "
        "ignores cancelled() can overlap its successor)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _registry_of(obj: Any) -> TaskRegistry | None:
    """The registry a hub or a task belongs to (a hub is known by its
    `registry`: the worker never imports the hub's module)."""
    if isinstance(obj, Task):
        return obj.registry
    registry = getattr(obj, "registry", None)
    return registry if isinstance(registry, TaskRegistry) else None


def find_registry(specs: list[str]) -> tuple[TaskRegistry, list[str]]:
    """Import each MODULE[:ATTR]; return the one registry of tasks (a hub's)
    and the tasks named by ATTR."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    registries: list[TaskRegistry] = []
    named: list[str] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from exc
        found: list[TaskRegistry]
        if attr:
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part, None)
            registry = _registry_of(obj)
            if registry is None:
                raise SystemExit(f"error: {spec} is neither a BgTasks hub nor a task")
            found = [registry]
            if isinstance(obj, Task):
                named.append(obj.name)
        else:
            found = [r for r in map(_registry_of, vars(module).values()) if r is not None]
        for registry in found:
            if not any(registry is r for r in registries):
                registries.append(registry)
    if not registries:
        raise SystemExit(f"error: no BgTasks hub or task found in {', '.join(specs)}")
    if len(registries) > 1:
        raise SystemExit("error: several hubs found; name one as MODULE:ATTR")
    return registries[0], named


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    if not args.url:
        print("error: pass --url (the mounted task API) or set BGTASKS_URL", file=sys.stderr)
        return 2
    registry, named = find_registry(args.modules)
    names = args.tasks or named or sorted(registry.tasks)
    try:
        config = WorkerConfig(
            url=args.url,
            token=args.token,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            grace_seconds=args.grace_seconds,
            max_result_bytes=registry.max_result_bytes,
            sync_isolation=args.sync_isolation,
            imports=tuple(spec.partition(":")[0] for spec in args.modules),
        )
        # The imports made tens of thousands of objects that live as long as
        # the process: a full collection (tens of ms) need not walk them.
        gc.freeze()
        anyio.run(run_worker, registry, names, config)
    except AccessDenied:
        return 1
    except BgTasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
