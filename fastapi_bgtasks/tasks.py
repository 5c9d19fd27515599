"""The `@bg.task` decorator's product: a function plus how to defer it.

A `Task` owns the pydantic models built from its signature, so arguments are
checked where the run is submitted (nothing bad is stored) and checked again
in the worker, where JSON becomes typed values before the call.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import typing
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PydanticSchemaGenerationError,
    PydanticUserError,
    TypeAdapter,
    create_model,
)
from pydantic_core import PydanticSerializationError

from .errors import (
    ConfigurationError,
    DuplicateTaskName,
    NotSerializable,
    PayloadTooLarge,
    TaskNotFound,
)

if TYPE_CHECKING:
    import asyncio

    from .taskrun import TaskRun

__all__ = ["Dispatcher", "Task", "TaskOptions", "TaskRegistry"]

P = ParamSpec("P")
R = TypeVar("R")

OnWorkerLost = Literal["retry", "fail"]


class Dispatcher(Protocol):
    """What a task's `delay`, `map`, `delay_sync` and `serve` call on: the
    hub, which knows where this process's submissions go."""

    async def submit(
        self,
        task: Task[Any, Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun: ...

    async def submit_map(
        self, task: Task[Any, Any], iterables: Sequence[Iterable[Any]], static: dict[str, Any]
    ) -> list[TaskRun]: ...

    def submit_sync(
        self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> TaskRun: ...

    def serve(self, *tasks: Task[Any, Any], url: str | None = None, **options: Any) -> None: ...


class RemoteRoute(Protocol):
    """Where a worker sends what its tasks submit: the app that feeds it."""

    async def aclose(self) -> None: ...


class TaskRegistry:
    """The tasks of one hub by name, and the limits every task's calls obey.

    A worker finds tasks here (never through the hub) and, while it serves
    them, sets `worker_route` and `worker_loop`: what its tasks submit goes
    back over HTTP to the app that feeds it.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_args_bytes: int,
        max_result_bytes: int,
        max_rescues: int,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_args_bytes = max_args_bytes
        self.max_result_bytes = max_result_bytes
        self.max_rescues = max_rescues
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.worker_route: RemoteRoute | None = None
        self.worker_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<TaskRegistry tasks={sorted(self.tasks)}>"

    def add(self, fn: Callable[P, R], name: str | None, options: TaskOptions) -> Task[P, R]:
        """Register `fn` under `name` (default: its `__name__`)."""
        if isinstance(fn, Task):
            fn = fn.fn
        task_name = name or getattr(fn, "__name__", None)
        if not task_name or len(task_name) > 200 or not task_name.isprintable():
            raise ConfigurationError(f"Invalid task name {task_name!r}")
        task = Task(fn, registry=self, name=task_name, options=options)
        existing = self.tasks.get(task_name)
        if existing is not None and not _same_function(existing.fn, fn):
            raise DuplicateTaskName(
                f"Task name {task_name!r} is taken by {_where(existing.fn)}; "
                f"cannot also register {_where(fn)}. Pass name=... to one of them."
            )
        self.tasks[task_name] = task
        return task

    def get(self, name: str) -> Task[Any, Any]:
        """The task of that name, or `TaskNotFound`."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(f"No task named {name!r} is registered.") from None


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same function re-registered: a module also run as __main__, or reloaded."""
    if a is b:
        return True
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
        and code_a is not None
        and code_b is not None
        and os.path.realpath(code_a.co_filename) == os.path.realpath(code_b.co_filename)
    )


def _where(fn: Callable[..., Any]) -> str:
    code = getattr(fn, "__code__", None)
    location = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)!s}{location}"


class TaskOptions(BaseModel):
    """How a task's runs are retried, timed out and rescued."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: int = Field(default=0, ge=0, le=1000)
    retry_delay_seconds: float | tuple[float, ...] = 0.0
    timeout_seconds: float | None = Field(default=None, gt=0)
    max_rescues: int | None = Field(default=None, ge=0, le=1000)
    on_worker_lost: OnWorkerLost = "retry"

    def retry_delays(self) -> list[float]:
        """The back-off before retry 1, 2, ...; the last value repeats."""
        delays = self.retry_delay_seconds
        if isinstance(delays, tuple):
            values = list(delays) or [0.0]
        else:
            values = [delays]
        if any(d < 0 for d in values):
            raise ConfigurationError("retry_delay_seconds must not be negative")
        return [float(d) for d in values]


# NaN and infinities are not JSON: refused when typed as floats, and kept as
# constants (then refused as NotSerializable) when they hide under `Any`.
_ARG_CONFIG = ConfigDict(
    allow_inf_nan=False, populate_by_name=False, extra="forbid", ser_json_inf_nan="constants"
)


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:
        # A forward reference that cannot be resolved yet: validate it as Any
        # rather than refuse the task.
        return {}


def _arguments_model(fn: Callable[..., Any], name: str) -> tuple[type[BaseModel], dict[str, str]]:
    """A model whose fields are the parameters. Field names are positional
    (`p0`, `p1`...) with the parameter name as alias, so parameters pydantic
    would not take as field names (`_private`, `model_config`) still work."""
    hints = _type_hints(fn)
    fields: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    for i, param in enumerate(inspect.signature(fn).parameters.values()):
        annotation = hints.get(param.name, Any)
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            annotation = list[annotation]  # type: ignore[valid-type]
            default: Any = ()
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            annotation = dict[str, annotation]  # type: ignore[valid-type]
            default = {}
        else:
            default = ... if param.default is inspect.Parameter.empty else param.default
        field = f"p{i}"
        aliases[param.name] = field
        fields[field] = (annotation, Field(default, alias=param.name))
    try:
        model = create_model(f"{name}_arguments", __config__=_ARG_CONFIG, **fields)
    except (PydanticSchemaGenerationError, TypeError) as exc:
        raise ConfigurationError(
            f"Task {name!r}: a parameter's type cannot be carried as JSON ({exc}). "
            "Annotate parameters with JSON-friendly types or pydantic models."
        ) from exc
    return model, aliases


def _result_adapter(annotation: Any) -> TypeAdapter[Any]:
    # NaN and infinities kept as themselves (then refused by json.dumps),
    # not silently turned into null. Models carry their own config.
    try:
        return TypeAdapter(annotation, config=ConfigDict(ser_json_inf_nan="constants"))
    except PydanticUserError:
        return TypeAdapter(annotation)


class Task(Generic[P, R]):
    """A function registered on a hub. Calling it runs it now, like the plain
    function; `delay` and `apply_async` store a run for a worker instead."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        registry: TaskRegistry,
        name: str,
        options: TaskOptions,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"@task needs a function, got {fn!r}")
        self.fn = fn
        self.registry = registry
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature = inspect.signature(fn)
        self._args_model, _ = _arguments_model(fn, name)
        hints = _type_hints(fn)
        try:
            self._result_adapter: TypeAdapter[Any] = _result_adapter(hints.get("return", Any))
        except (PydanticSchemaGenerationError, PydanticUserError) as exc:
            raise ConfigurationError(
                f"Task {name!r}: its return type cannot be carried as JSON ({exc})."
            ) from exc
        self.retry_delays = options.retry_delays()
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} of {self.fn.__module__}.{self.fn.__qualname__}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def max_attempts(self) -> int:
        return self.options.retries + 1

    @property
    def max_rescues(self) -> int:
        if self.options.on_worker_lost == "fail":
            return 0
        if self.options.max_rescues is not None:
            return self.options.max_rescues
        return self.registry.max_rescues

    # -- arguments -------------------------------------------------------

    def dump_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validate a call against the signature and return it as JSON values.

        Raises pydantic's `ValidationError` for a bad call, `NotSerializable`
        for values JSON cannot carry, and `PayloadTooLarge` over the hub's limit.
        """
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise self._binding_error(exc, args, kwargs) from None
        model = self._args_model.model_validate(bound.arguments)
        try:
            data = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
        except PydanticSerializationError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} cannot be carried as JSON: {exc}"
            ) from exc
        json_args, json_kwargs = self._split(data)
        try:
            encoded = json.dumps(
                [json_args, json_kwargs], separators=(",", ":"), allow_nan=False, ensure_ascii=False
            ).encode()
        except UnicodeEncodeError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} hold text that is not valid Unicode "
                "(a lone surrogate), which cannot be stored."
            ) from exc
        except ValueError as exc:
            raise NotSerializable(
                f"Arguments of task {self.name!r} hold NaN or an infinity, which JSON cannot carry."
            ) from exc
        size = len(encoded)
        if size > self.registry.max_args_bytes:
            raise PayloadTooLarge(
                f"Arguments of task {self.name!r} are {size} bytes as JSON; "
                f"the limit is {self.registry.max_args_bytes} (max_args_bytes)."
            )
        return json_args, json_kwargs

    def load_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Stored JSON back to typed values, validated again (the worker side)."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise self._binding_error(exc, args, kwargs) from None
        model = self._args_model.model_validate(bound.arguments)
        values = {
            name: getattr(model, f"p{i}")
            for i, name in enumerate(self._signature.parameters)
            if name in bound.arguments
        }
        rebound = inspect.BoundArguments(self._signature, values)
        return rebound.args, rebound.kwargs

    def _split(self, data: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        # Only the arguments the caller passed are stored (defaults apply in
        # the worker), normalised: whatever can be passed by position is.
        bound = inspect.BoundArguments(self._signature, data)
        return list(bound.args), dict(bound.kwargs)

    def _binding_error(self, exc: TypeError, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

        detail: InitErrorDetails = {
            "type": PydanticCustomError("arguments_mismatch", str(exc)),
            "loc": ("arguments",),
            "input": {"args": list(args), "kwargs": kwargs},
        }
        return ValidationError.from_exception_data(f"{self.name} arguments", [detail])

    # -- results ---------------------------------------------------------

    def dump_result(self, value: Any) -> Any:
        """A return value as JSON; raises NotSerializable naming the type."""
        try:
            result = self._result_adapter.dump_python(value, mode="json")
            json.dumps(result, allow_nan=False, ensure_ascii=False).encode()
        except (PydanticSerializationError, ValueError) as exc:  # incl. UnicodeEncodeError
            raise NotSerializable(
                f"Task {self.name!r} returned a {type(value).__name__}, "
                f"which cannot be carried as JSON: {exc}"
            ) from exc
        return result

    def load_result(self, value: Any) -> Any:
        """A stored result back to the declared return type."""
        return self._result_adapter.validate_python(value)

    # -- deferring -------------------------------------------------------

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun:
        """Store a run of this task for a worker, and return it SCHEDULED."""
        return await self.registry.dispatcher.submit(self, args, kwargs)

    async def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> TaskRun:
        """`delay` with scheduling: `countdown` seconds or an aware `eta`, an
        idempotency key (a repeat returns the stored run), and a priority
        (higher runs first)."""
        return await self.registry.dispatcher.submit(
            self,
            tuple(args),
            dict(kwargs or {}),
            countdown=countdown,
            eta=eta,
            idempotency_key=idempotency_key,
            priority=priority,
        )

    async def map(self, *iterables: Iterable[Any], **static: Any) -> list[TaskRun]:
        """One run per item, like the builtin `map`: `zip(*iterables)` gives
        each run's positional arguments (the iterables must be as long as
        each other), `static` keyword arguments go to every run. Every call
        is validated before anything is stored; then all runs are stored in
        one transaction, or none."""
        return await self.registry.dispatcher.submit_map(self, iterables, static)

    def delay_sync(self, *args: P.args, **kwargs: P.kwargs) -> TaskRun:
        """`delay` for synchronous code: a sync route, a script, a sync task."""
        return self.registry.dispatcher.submit_sync(self, args, kwargs)

    def serve(self, url: str | None = None, **options: Any) -> None:
        """Run a worker for this task in this process until interrupted."""
        self.registry.dispatcher.serve(self, url=url, **options)
