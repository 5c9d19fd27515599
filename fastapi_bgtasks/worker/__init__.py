"""④ The worker: `python -m fastapi_bgtasks.worker MODULE --url URL`.

`__main__` is the CLI; `runtime` runs the task group (the feed, signals,
the drain); `execution` runs one run; `reporter` sends reports; `leases`
renews and fences leases; `held` is the runs held; `config` what the worker
is told; `context` what a running task sees. It speaks to the app through
`fastapi_bgtasks.client` only: nothing here imports SQLAlchemy or FastAPI.
"""

from .context import cancelled, current_run

__all__ = ["cancelled", "current_run"]
