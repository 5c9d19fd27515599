"""④ The worker: `python -m fastapi_bgtasks.worker MODULE --url URL`.

`__main__` is the CLI, `client` speaks HTTP and SSE to the mounted API,
`runtime` runs the task group. Nothing here imports SQLAlchemy.
"""

from .context import cancelled, current_run

__all__ = ["cancelled", "current_run"]
