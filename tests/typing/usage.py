"""The public API as a user writes it, type-checked with `mypy --strict` by
test_typing.py: each `assert_type` pins what a call is typed as, and each
`# type: ignore[...]` marks a call mypy must refuse (an unused ignore fails
the check, so a check that stopped catching a wrong call is caught)."""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, assert_type

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from fastapi_bgtasks import BgTasks, RunState, Submitter, Task, TaskRun

bg = BgTasks("sqlite+aiosqlite:///./typing.db")


class Report(BaseModel):
    pages: int


@bg.task
async def add(a: int, b: int) -> int:
    return a + b


@bg.task(name="greet", retries=2, timeout_seconds=5)
def greet(name: str, *, polite: bool = False) -> str:
    return f"Good day, {name}" if polite else f"Hi {name}"


@bg.task(retries=1)
async def build_report(title: str) -> Report:
    return Report(pages=len(title))


app = FastAPI(lifespan=bg.lifespan)
app.mount("/tasks", bg.app)


def a_task_is_typed_by_its_parameters_and_awaited_result() -> None:
    sum_task: Task[[int, int], int] = add
    greet_task: Task[[str], str] = greet
    report_task: Task[[str], Report] = build_report
    del sum_task, greet_task, report_task


async def calling_a_task_runs_the_plain_function() -> None:
    assert_type(greet("Ada"), str)
    coroutine = assert_type(add(1, 2), Coroutine[Any, Any, int])
    assert_type(await coroutine, int)


async def a_run_of_an_async_task_gives_its_awaited_type() -> None:
    run = await add.delay(1, 2)
    assert_type(run, TaskRun[int])
    assert_type(await run.result(), int)
    assert_type(await (await build_report.delay("q3")).result(timeout=5), Report)
    assert_type(await run.wait(), RunState)


async def a_run_of_a_sync_task_gives_its_return_type() -> None:
    run = await greet.delay("Ada", polite=True)
    assert_type(await run.result(), str)
    assert_type(greet.delay_sync("Ada"), TaskRun[str])


async def scheduling_and_mapping_keep_the_result_type() -> None:
    later = await add.apply_async((1, 2), eta=datetime.now(UTC), priority=5)
    assert_type(later, TaskRun[int])
    assert_type(await add.map([1, 2], [3, 4]), list[TaskRun[int]])


async def a_route_submits_through_the_submitter(
    submit: Submitter = Depends(bg.submitter),
) -> dict[str, str]:
    run = await submit.delay(add, 1, 2)
    assert_type(run, TaskRun[int])
    assert_type(await run.result(), int)
    assert_type(await submit.delay(greet, "Ada", polite=True), TaskRun[str])
    assert_type(await submit.apply_async(build_report, ("q3",), countdown=60), TaskRun[Report])
    assert_type(await submit.map(add, [1, 2], [3, 4]), list[TaskRun[int]])
    return {"task_run_id": str(run.id)}


async def a_wrong_argument_is_refused_by_the_type_checker(submit: Submitter) -> None:
    await add.delay("a", 2)  # type: ignore[arg-type]
    await submit.delay(add, "a", 2)  # type: ignore[arg-type]
    await greet.delay("Ada", polite="yes")  # type: ignore[arg-type]
    await submit.delay(greet, "Ada", rude=True)  # type: ignore[call-arg]
    greet.delay_sync(42)  # type: ignore[arg-type]
    await add.delay(1)  # type: ignore[call-arg]


async def a_result_is_not_typed_as_a_coroutine() -> None:
    total = await (await add.delay(1, 2)).result()
    total.close()  # type: ignore[attr-defined]
