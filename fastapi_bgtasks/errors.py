"""The exceptions fastapi_bgtasks raises, and the one place that maps them to HTTP.

Every error a caller can act on is a `BgTasksError`; its docstring is its
default message and `status_code` / `code` say how the mounted API answers it::

    BgTasksError
    ├── ConfigurationError        a hub, task or worker set up wrongly (raised at import or start)
    │   └── DuplicateTaskName     two different functions under one task name
    ├── SchemaError               the database has no schema, or a newer one
    ├── StoreUnavailable    503   the database cannot be reached
    ├── SubmitError               a submission that cannot be stored
    │   ├── TaskNotFound      404 no task of that name is registered
    │   ├── InvalidArguments  422 arguments that do not match the task's signature (over HTTP)
    │   ├── InvalidSchedule   422 countdown with eta, a naive eta, a bad priority
    │   ├── NotSerializable   422 arguments or a result JSON cannot carry
    │   ├── PayloadTooLarge   413 a body, argument set or result over its limit
    │   └── IdempotencyConflict 409 an idempotency key reused with other arguments
    ├── InvalidValue          422 a value the database refuses (a NUL character, ...)
    ├── InvalidName           422 a task name or worker id that is not printable text
    ├── InvalidCursor         422 a `GET /runs` cursor this API did not return
    ├── RunNotFound           404 no run has that id (or the caller may not see it)
    ├── RunFinished           409 the run already reached a terminal state
    ├── AccessDenied          401 a missing or wrong credential
    ├── RateLimited           429 too many failures, streams or feeds
    ├── InvalidRequest        422 a request that does not match the route's schema
    ├── BadRequest            400 a body that cannot be read (not UTF-8, nested too deeply)
    ├── Forbidden             403 the host's `auth=` dependency refused the caller
    ├── RouteNotFound         404 no route has this path
    ├── MethodNotAllowed      405 the route does not take this method
    ├── NotAcceptable         406 the route cannot answer in an accepted media type
    ├── UnsupportedMediaType  415 a body in a media type the route does not read
    ├── TaskRunFailed             a run ended FAILED, CRASHED or CANCELLED
    └── RemoteError               the mounted API answered with an error body

Bad arguments raise pydantic's own `ValidationError` (a 422 over HTTP, answered
as `InvalidArguments`), so callers handle them the way they handle any pydantic
model. The seven classes from `InvalidRequest` on are how the mounted API
answers what FastAPI and Starlette refuse before a route runs.

`ERRORS` is the table both directions read: the mounted API answers an
exception with its `status_code` and `code`, and the HTTP client turns an
error body back into the same class with `from_response`.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERRORS",
    "AccessDenied",
    "BadRequest",
    "BgTasksError",
    "ConfigurationError",
    "DuplicateTaskName",
    "Forbidden",
    "IdempotencyConflict",
    "InvalidArguments",
    "InvalidCursor",
    "InvalidName",
    "InvalidRequest",
    "InvalidSchedule",
    "InvalidValue",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotSerializable",
    "PayloadTooLarge",
    "RateLimited",
    "RemoteError",
    "RouteNotFound",
    "RunFinished",
    "RunNotFound",
    "SchemaError",
    "StoreUnavailable",
    "SubmitError",
    "TaskNotFound",
    "TaskRunFailed",
    "UnsupportedMediaType",
    "from_response",
]


class BgTasksError(Exception):
    """fastapi_bgtasks could not do what was asked."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str | None = None, *, detail: Any = None) -> None:
        self.message = message or (self.__doc__ or "").strip().splitlines()[0]
        self.detail = detail
        super().__init__(self.message)

    def to_body(self) -> dict[str, Any]:
        """The JSON error body every route answers with."""
        return {"error": self.code, "message": self.message, "detail": self.detail}


class ConfigurationError(BgTasksError):
    """fastapi_bgtasks is configured in a way that cannot work."""

    code = "configuration_error"


class DuplicateTaskName(ConfigurationError):
    """Another function is already registered under this task name."""

    code = "duplicate_task_name"


class SchemaError(BgTasksError):
    """The database does not hold a schema this version of fastapi_bgtasks can use."""

    status_code = 503
    code = "schema_error"


class StoreUnavailable(BgTasksError):
    """The task store is unavailable; try again shortly."""

    status_code = 503
    code = "store_unavailable"


class SubmitError(BgTasksError):
    """The run could not be submitted."""

    status_code = 422
    code = "submit_error"


class TaskNotFound(SubmitError):
    """No task of that name is registered."""

    status_code = 404
    code = "task_not_found"


class InvalidSchedule(SubmitError):
    """The run's schedule is invalid."""

    status_code = 422
    code = "invalid_schedule"


class NotSerializable(SubmitError):
    """A value cannot be carried as JSON."""

    status_code = 422
    code = "not_serializable"


class PayloadTooLarge(SubmitError):
    """The payload is larger than the configured limit."""

    status_code = 413
    code = "payload_too_large"


class InvalidArguments(SubmitError):
    """The arguments do not match the task's signature."""

    status_code = 422
    code = "invalid_arguments"


class IdempotencyConflict(SubmitError):
    """This idempotency key was already used for a run with other arguments."""

    status_code = 409
    code = "idempotency_conflict"


class InvalidValue(BgTasksError):
    """A value in the request cannot be stored (for example a NUL character)."""

    status_code = 422
    code = "invalid_value"


class InvalidName(BgTasksError):
    """Task names and worker ids must be printable text of at most 200 characters."""

    status_code = 422
    code = "invalid_name"


class InvalidCursor(BgTasksError):
    """The cursor is not one this API returned."""

    status_code = 422
    code = "invalid_cursor"


class RunNotFound(BgTasksError):
    """No run has this id."""

    status_code = 404
    code = "run_not_found"


class RunFinished(BgTasksError):
    """The run has already finished."""

    status_code = 409
    code = "run_finished"


class AccessDenied(BgTasksError):
    """This route needs a valid credential."""

    status_code = 401
    code = "unauthorized"


class RemoteError(BgTasksError):
    """The task API answered with an error."""

    code = "remote_error"

    def __init__(self, status_code: int, body: dict[str, Any] | None, url: str) -> None:
        body = body or {}
        self.remote_status = status_code
        self.remote_code = str(body.get("error", "http_error"))
        super().__init__(
            f"{url} answered {status_code} {self.remote_code}: {body.get('message', '')}".strip(),
            detail=body.get("detail"),
        )


class RateLimited(BgTasksError):
    """Too many requests of this kind; wait and try again."""

    status_code = 429
    code = "too_many_requests"


class InvalidRequest(BgTasksError):
    """The request is not valid; see detail for each problem."""

    status_code = 422
    code = "invalid_request"


class BadRequest(BgTasksError):
    """The request body cannot be read: it is not UTF-8, or it nests too deeply."""

    status_code = 400
    code = "bad_request"


class Forbidden(BgTasksError):
    """The caller may not use this route."""

    status_code = 403
    code = "forbidden"


class RouteNotFound(BgTasksError):
    """No route has this path."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(BgTasksError):
    """This route does not take this method."""

    status_code = 405
    code = "method_not_allowed"


class NotAcceptable(BgTasksError):
    """This route cannot answer in a media type the request accepts."""

    status_code = 406
    code = "not_acceptable"


class UnsupportedMediaType(BgTasksError):
    """This route does not read a body of this media type."""

    status_code = 415
    code = "unsupported_media_type"


class TaskRunFailed(BgTasksError):
    """The task run did not complete."""

    code = "task_run_failed"

    def __init__(
        self,
        run_id: Any,
        state: Any,
        error_type: str | None,
        error_message: str | None,
    ) -> None:
        self.run_id = run_id
        self.state = state
        self.error_type = error_type
        self.error_message = error_message
        state_name = getattr(state, "value", state)
        super().__init__(
            f"Task run {run_id} ended {state_name}: "
            f"{error_type or 'no error'}: {error_message or ''}"
        )


def _table() -> dict[str, type[BgTasksError]]:
    found: dict[str, type[BgTasksError]] = {}
    pending: list[type[BgTasksError]] = [BgTasksError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__ == __name__ and cls not in (BgTasksError, RemoteError, TaskRunFailed):
            found[cls.code] = cls
    return dict(sorted(found.items()))


ERRORS: dict[str, type[BgTasksError]] = _table()
"""Every error the mounted API can answer with, by its `code`."""


def from_response(status_code: int, body: Any, url: str) -> BgTasksError:
    """The exception an error response stands for: the class its `error` code
    names when the status agrees, else `RemoteError` with what was said."""
    if not isinstance(body, dict):
        body = {"message": str(body)[:200]}
    cls = ERRORS.get(str(body.get("error", "")))
    if cls is not None and cls.status_code == status_code:
        message = body.get("message")
        return cls(message if isinstance(message, str) else None, detail=body.get("detail"))
    if status_code == 413:
        return PayloadTooLarge(str(body.get("message") or "") or None)
    if status_code == 503:
        return StoreUnavailable(str(body.get("message") or "") or None)
    return RemoteError(status_code, body, url)
