"""④ Whether this worker can accept a delivery, decided as it arrives: the
task is one it serves, and the run's arguments bind to and validate against
its own version of the task's signature. A run it cannot accept is handed
back (a REJECTED report) so that a worker which can takes it, and no retry
is spent: in a rolling deploy, old and new workers serve one queue.

Also the one way a validation error becomes a stored message: locations
and error types, never the values (they may be the run's arguments, which
capability readers of the run document must not see).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..wire import Delivery, ErrorInfo

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = ["Call", "error_message", "load_call", "validation_summary"]

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""A run's positional and keyword arguments, validated and typed."""

# Our own binding error (tasks.py): its text names parameters, never values.
_BINDING = "arguments_mismatch"


def load_call(task: Task[Any, Any] | None, delivery: Delivery) -> Call | ErrorInfo:
    """The arguments to call `task` with, or why this worker cannot accept
    the run: `UnknownTask` (it does not serve that task) or
    `IncompatibleArguments` (they do not fit its signature of the task)."""
    if task is None:
        return ErrorInfo(
            type="UnknownTask", message=f"This worker does not serve task {delivery.task!r}."
        )
    try:
        args, kwargs = task.load_arguments(delivery.args, delivery.kwargs)
    except ValidationError as exc:
        return ErrorInfo(
            type="IncompatibleArguments",
            message=(
                f"The arguments do not fit this worker's signature of task {delivery.task!r} "
                f"({validation_summary(exc)}); another version of the task may accept them."
            )[:10_000],
        )
    return tuple(args), dict(kwargs)


def validation_summary(exc: ValidationError) -> str:
    """Each error's location and type, e.g. `width: missing; size: int_parsing`."""
    parts = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        if error["type"] == _BINDING:
            parts.append(error["msg"])
            continue
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        parts.append(f"{where}: {error['type']}")
    return "; ".join(parts) or "invalid"


def error_message(exc: BaseException) -> str:
    """An exception's message as stored in the run's `error`: `str(exc)`,
    except that a pydantic validation error is told without its inputs."""
    if isinstance(exc, ValidationError):
        count = exc.error_count()
        noun = "error" if count == 1 else "errors"
        return f"{count} validation {noun} for {exc.title}: {validation_summary(exc)}"
    return str(exc)
