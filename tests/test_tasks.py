"""Registering tasks and checking their arguments, with no database: the
`@bg.task` decorator, `Task`'s JSON round trip, and the checks that raise
before a submission touches the store. One behaviour per test."""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from fastapi_bgtasks import (
    BgTasks,
    ConfigurationError,
    DuplicateTaskName,
    InvalidSchedule,
    NotSerializable,
    PayloadTooLarge,
    Task,
)


class Point(BaseModel):
    x: int
    y: int


class Opaque:
    """A class pydantic has no schema for."""


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bg(tmp_path: Path) -> BgTasks:
    return BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x.db")


@pytest.fixture
def typed(bg: BgTasks) -> Task[Any, Any]:
    @bg.task
    def typed_job(
        n: int, when: datetime, ident: uuid.UUID, point: Point, *, label: str = ""
    ) -> int:
        return n

    return typed_job


def make_job() -> Callable[[int], int]:
    """Each call makes a new function object with the same qualname and file,
    like a module imported again (or also run as __main__)."""

    def job(n: int) -> int:
        return n

    return job


# -- registering ---------------------------------------------------------------


def test_a_bare_decorator_registers_a_task_named_after_the_function(bg: BgTasks) -> None:
    @bg.task
    def send_email(to: str) -> str:
        return to

    assert isinstance(send_email, Task)
    assert send_email.name == "send_email"
    assert bg.tasks["send_email"] is send_email


def test_a_decorator_with_options_keeps_them_on_the_task(bg: BgTasks) -> None:
    @bg.task(name="emails.send", retries=3, retry_delay_seconds=2, timeout_seconds=60)
    async def send_email(to: str) -> str:
        return to

    assert send_email.name == "emails.send"
    assert bg.tasks["emails.send"] is send_email
    assert send_email.options.retries == 3
    assert send_email.max_attempts == 4
    assert send_email.options.timeout_seconds == 60
    assert send_email.retry_delays == [2.0]


def test_retry_delay_seconds_may_be_a_list_of_back_offs(bg: BgTasks) -> None:
    @bg.task(retries=3, retry_delay_seconds=[0.1, 0.5, 1])
    def job() -> None:
        return None

    assert job.retry_delays == [0.1, 0.5, 1.0]


def test_a_task_name_defaults_to_the_functions_name_not_its_qualname(bg: BgTasks) -> None:
    class Holder:
        @staticmethod
        def nested_job() -> None:
            return None

    task = bg.task(Holder.nested_job)
    assert task.name == "nested_job"


def test_registering_the_same_function_twice_keeps_one_task(bg: BgTasks) -> None:
    def job(n: int) -> int:
        return n

    first = bg.task(job)
    second = bg.task(job)
    assert first.fn is second.fn is job
    assert list(bg.tasks) == ["job"]


def test_registering_a_redefinition_with_the_same_qualname_and_file_replaces_it(
    bg: BgTasks,
) -> None:
    old, new = make_job(), make_job()
    assert old is not new
    bg.task(old)
    replacement = bg.task(new)
    assert bg.tasks["job"] is replacement
    assert replacement.fn is new


def test_a_different_function_under_a_taken_name_raises_naming_both(bg: BgTasks) -> None:
    def first_function() -> None:
        return None

    def second_function() -> None:
        return None

    bg.task(name="shared")(first_function)
    with pytest.raises(DuplicateTaskName) as excinfo:
        bg.task(name="shared")(second_function)
    message = str(excinfo.value)
    assert "first_function" in message
    assert "second_function" in message
    assert "shared" in message
    assert bg.tasks["shared"].fn is first_function


def test_duplicate_task_name_is_a_configuration_error(bg: BgTasks) -> None:
    bg.task(name="shared")(lambda: None)
    with pytest.raises(ConfigurationError):
        bg.task(name="shared")(make_job())


def test_calling_a_sync_task_runs_it_now(bg: BgTasks) -> None:
    calls: list[int] = []

    @bg.task
    def job(n: int) -> int:
        calls.append(n)
        return n * 2

    assert job(21) == 42
    assert calls == [21]


@pytest.mark.anyio
async def test_calling_an_async_task_returns_its_coroutine(bg: BgTasks) -> None:
    @bg.task
    async def job(n: int) -> int:
        return n * 2

    coroutine = job(21)
    assert inspect.iscoroutine(coroutine)
    assert await coroutine == 42


def test_a_parameter_type_pydantic_cannot_handle_raises_at_registration(bg: BgTasks) -> None:
    def job(thing: Opaque) -> None:
        return None

    with pytest.raises(ConfigurationError, match="job"):
        bg.task(job)
    assert "job" not in bg.tasks


def test_a_return_type_pydantic_cannot_handle_raises_at_registration(bg: BgTasks) -> None:
    def job() -> Opaque:
        return Opaque()

    with pytest.raises(ConfigurationError):
        bg.task(job)


@pytest.mark.parametrize(
    "options",
    [
        {"retries": -1},
        {"timeout_seconds": 0},
        {"timeout_seconds": -5},
        {"retry_delay_seconds": -1},
        {"retry_delay_seconds": [1, -1]},
        {"max_rescues": -1},
        {"on_worker_lost": "explode"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_invalid_task_options_raise_a_configuration_error(
    bg: BgTasks, options: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError):

        @bg.task(**options)
        def job() -> None:
            return None

    assert "job" not in bg.tasks


# -- arguments -----------------------------------------------------------------


def test_dump_arguments_validates_in_lax_mode(bg: BgTasks) -> None:
    @bg.task
    def job(n: int, *, ratio: float) -> None:
        return None

    assert job.dump_arguments(["3"], {"ratio": "0.5"}) == ([3], {"ratio": 0.5})


def test_dump_arguments_returns_json_values(typed: Task[Any, Any]) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-4678-9234-567812345678")
    args, kwargs = typed.dump_arguments([1, when, ident, Point(x=1, y=2)], {"label": "a"})
    assert args == [1, "2030-01-02T03:04:05Z", str(ident), {"x": 1, "y": 2}]
    assert kwargs == {"label": "a"}


def test_dump_arguments_stores_only_the_arguments_passed(bg: BgTasks) -> None:
    @bg.task
    def job(a: int, b: int = 5, *, c: str = "x") -> None:
        return None

    assert job.dump_arguments([1], {}) == ([1], {})


def test_dump_arguments_raises_validation_error_for_a_wrong_type(bg: BgTasks) -> None:
    @bg.task
    def job(n: int) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments(["three"], {})


def test_dump_arguments_raises_validation_error_for_a_missing_argument(bg: BgTasks) -> None:
    @bg.task
    def job(a: int, b: int) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments([1], {})


def test_dump_arguments_raises_validation_error_for_an_extra_positional_argument(
    bg: BgTasks,
) -> None:
    @bg.task
    def job(a: int) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments([1, 2], {})


def test_dump_arguments_raises_validation_error_for_an_unknown_keyword(bg: BgTasks) -> None:
    @bg.task
    def job(a: int) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments([1], {"nope": 2})


def test_dump_arguments_raises_not_serializable_for_an_object_json_cannot_carry(
    bg: BgTasks,
) -> None:
    @bg.task
    def job(value: Any) -> None:
        return None

    with pytest.raises(NotSerializable):
        job.dump_arguments([object()], {})


def test_dump_arguments_raises_payload_too_large_over_max_args_bytes(tmp_path: Path) -> None:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x.db", max_args_bytes=100)

    @hub.task
    def job(text: str) -> None:
        return None

    job.dump_arguments(["x" * 50], {})
    with pytest.raises(PayloadTooLarge):
        job.dump_arguments(["x" * 200], {})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_dump_arguments_rejects_non_finite_floats(bg: BgTasks, value: float) -> None:
    @bg.task
    def job(x: float) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments([value], {})


def test_dump_arguments_rejects_nan_inside_a_list_of_floats(bg: BgTasks) -> None:
    @bg.task
    def job(xs: list[float]) -> None:
        return None

    with pytest.raises(ValidationError):
        job.dump_arguments([[1.0, math.nan]], {})


def test_dump_arguments_refuses_nan_under_an_any_annotation(bg: BgTasks) -> None:
    @bg.task
    def job(value: Any) -> None:
        return None

    with pytest.raises((ValidationError, NotSerializable)):
        job.dump_arguments([math.nan], {})


def test_load_arguments_turns_json_back_into_typed_values(typed: Task[Any, Any]) -> None:
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.uuid4()
    stored = typed.dump_arguments([7, when, ident, Point(x=1, y=2)], {"label": "a"})
    args, kwargs = typed.load_arguments(*stored)
    assert args == (7, when, ident, Point(x=1, y=2))
    assert isinstance(args[1], datetime) and args[1].utcoffset() == timedelta(0)
    assert isinstance(args[2], uuid.UUID)
    assert isinstance(args[3], Point)
    assert kwargs == {"label": "a"}


def test_load_arguments_keeps_keyword_arguments_as_keywords(bg: BgTasks) -> None:
    @bg.task
    def job(a: int, *, when: datetime) -> None:
        return None

    args, kwargs = job.load_arguments([1], {"when": "2030-01-01T00:00:00Z"})
    assert args == (1,)
    assert kwargs == {"when": datetime(2030, 1, 1, tzinfo=UTC)}


def test_load_arguments_validates_again(bg: BgTasks) -> None:
    @bg.task
    def job(n: int) -> None:
        return None

    with pytest.raises(ValidationError):
        job.load_arguments(["not a number"], {})


def test_load_arguments_by_position_agrees_with_binding_the_signature(bg: BgTasks) -> None:
    """Calls stored all by position bind without `Signature.bind`: the same
    values, defaults left to the call, and the same errors."""

    @bg.task
    def job(a: int, b: str = "x", c: float = 1.5) -> None:
        return None

    for stored in ([1], [1, "y"], [1, "y", 2]):
        args, kwargs = job.load_arguments(stored, {})
        bound = job.codec.signature.bind(*stored)
        assert (args, kwargs) == (tuple(bound.arguments.values()), {})
        assert [type(v) for v in args] == [int, str, float][: len(stored)]
    assert job.load_arguments([1], {"c": 3}) == ((1,), {"c": 3.0})
    for stored in ([], [1, "y", 2, 3]):
        with pytest.raises(ValidationError, match="arguments_mismatch"):
            job.load_arguments(stored, {})
    with pytest.raises(ValidationError, match="int_parsing"):
        job.load_arguments(["one"], {})


def test_dump_result_and_load_result_round_trip_a_model(bg: BgTasks) -> None:
    @bg.task
    def job() -> Point:
        return Point(x=1, y=2)

    stored = job.dump_result(job())
    assert stored == {"x": 1, "y": 2}
    assert job.load_result(stored) == Point(x=1, y=2)


def test_dump_result_and_load_result_round_trip_a_datetime(bg: BgTasks) -> None:
    when = datetime(2030, 1, 2, tzinfo=UTC)

    @bg.task
    def job() -> datetime:
        return when

    stored = job.dump_result(when)
    assert isinstance(stored, str)
    assert job.load_result(stored) == when


def test_dump_result_raises_not_serializable_naming_the_type(bg: BgTasks) -> None:
    @bg.task
    def job() -> Any:
        return Opaque()

    with pytest.raises(NotSerializable, match="Opaque"):
        job.dump_result(job())


# -- schedules, raised before the store is touched -----------------------------


@pytest.mark.anyio
async def test_apply_async_with_countdown_and_eta_raises_invalid_schedule(
    tmp_path: Path,
) -> None:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x.db")

    @hub.task
    def job() -> None:
        return None

    with pytest.raises(InvalidSchedule):
        await job.apply_async(countdown=5, eta=datetime.now(UTC) + timedelta(minutes=1))
    assert not (tmp_path / "x.db").exists()


@pytest.mark.anyio
async def test_apply_async_with_a_naive_eta_raises_invalid_schedule(tmp_path: Path) -> None:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x.db")

    @hub.task
    def job() -> None:
        return None

    with pytest.raises(InvalidSchedule):
        await job.apply_async(eta=datetime(2030, 1, 1))
    assert not (tmp_path / "x.db").exists()


@pytest.mark.anyio
async def test_delay_with_bad_arguments_raises_before_opening_the_store(tmp_path: Path) -> None:
    hub = BgTasks(f"sqlite+aiosqlite:///{tmp_path}/x.db")

    @hub.task
    def job(n: int) -> None:
        return None

    with pytest.raises(ValidationError):
        await job.delay("three")  # type: ignore[arg-type]
    assert not (tmp_path / "x.db").exists()


# -- the hub -------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def test_creating_a_hub_creates_no_file(in_tmp: Path) -> None:
    hub = BgTasks()

    @hub.task
    def job() -> None:
        return None

    assert hub.app is not None
    assert list(in_tmp.iterdir()) == []


def test_a_hub_defaults_to_a_sqlite_file_in_the_working_directory(in_tmp: Path) -> None:
    assert BgTasks().database_url == "sqlite+aiosqlite:///./bgtasks.db"


def test_a_hub_reads_bgtasks_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGTASKS_DATABASE_URL", "postgresql+asyncpg://app@db/app")
    assert BgTasks().database_url == "postgresql+asyncpg://app@db/app"


def test_a_database_url_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGTASKS_DATABASE_URL", "postgresql+asyncpg://app@db/app")
    assert (
        BgTasks("sqlite+aiosqlite:///./other.db").database_url == "sqlite+aiosqlite:///./other.db"
    )


def test_a_non_positive_lease_raises_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        BgTasks(lease_seconds=0)


def test_serve_without_a_url_raises_saying_to_pass_one(bg: BgTasks) -> None:
    @bg.task
    def job() -> None:
        return None

    with pytest.raises(ConfigurationError, match="url"):
        bg.serve()


def test_task_serve_without_a_url_raises_a_configuration_error(bg: BgTasks) -> None:
    @bg.task
    def job() -> None:
        return None

    with pytest.raises(ConfigurationError):
        job.serve()
