"""Status (server/status.py): reading, listing and cancelling runs over HTTP,
on SQLite and PostgreSQL. One behaviour per test."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from fastapi_bgtasks.wire import CURSOR_PATTERN
from tests.server.apikit import (
    api,
    assert_error,
    submit,
)

pytestmark = pytest.mark.anyio

# -- GET /runs/{id} ------------------------------------------------------------


async def test_reading_a_run_returns_its_document(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        response = await http.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == run_id
    assert doc["state"] == "SCHEDULED"
    assert doc["args"] == [1, 2]


async def test_a_malformed_run_id_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs/not-a-uuid")
    assert_error(response, 422)


async def test_an_unknown_run_id_is_a_404(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get(f"/tasks/runs/{uuid.uuid4()}")
    assert_error(response, 404, "run_not_found")


# -- GET /runs -----------------------------------------------------------------


async def test_listing_runs_pages_through_all_of_them_newest_first(db_url: str) -> None:
    async with api(db_url) as (_, http):
        submitted = [await submit(http, "add", i, i) for i in range(5)]
        seen: list[dict[str, Any]] = []
        pages = 0
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            response = await http.get("/tasks/runs", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["runs"]) <= 2
            seen += page["runs"]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert pages == 3
    ids = [r["id"] for r in seen]
    assert sorted(ids) == sorted(submitted) and len(set(ids)) == 5
    created = [r["created_at"] for r in seen]
    assert created == sorted(created, reverse=True)


async def test_listing_runs_filters_by_task(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http, "add", 1, 2)
        echo_id = await submit(http, "echo", "hi")
        response = await http.get("/tasks/runs", params={"task": "echo"})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["runs"]] == [echo_id]


async def test_listing_runs_filters_by_state(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http)
        cancelled = await submit(http)
        assert (await http.post(f"/tasks/runs/{cancelled}/cancel")).status_code == 200
        response = await http.get("/tasks/runs", params={"state": "CANCELLED"})
    assert response.status_code == 200, response.text
    assert [r["id"] for r in response.json()["runs"]] == [cancelled]


async def test_listing_runs_with_a_filter_shaped_like_sql_finds_nothing(db_url: str) -> None:
    async with api(db_url) as (_, http):
        await submit(http)
        response = await http.get("/tasks/runs", params={"task": "' OR 1=1--"})
    assert response.status_code == 200, response.text
    assert response.json()["runs"] == []


async def test_listing_runs_with_a_nul_in_the_task_filter_is_not_a_server_error(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"task": "a\x00b"})
    assert response.status_code < 500, response.text


async def test_a_limit_over_max_list_limit_is_a_422(db_url: str) -> None:
    async with api(db_url, max_list_limit=10) as (_, http):
        response = await http.get("/tasks/runs", params={"limit": 11})
    assert_error(response, 422)


async def test_an_unknown_state_filter_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"state": "DONE"})
    assert_error(response, 422)


async def test_a_cursor_this_api_did_not_return_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert_error(response, 422)


# -- cancel --------------------------------------------------------------------


async def test_cancelling_a_scheduled_run_answers_200_cancelled(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        response = await http.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "CANCELLED"
    assert response.json()["finished_at"].endswith("Z")
    assert stored["state"] == "CANCELLED"


async def test_cancelling_a_finished_run_again_is_a_409(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        assert (await http.post(f"/tasks/runs/{run_id}/cancel")).status_code == 200
        response = await http.post(f"/tasks/runs/{run_id}/cancel")
    assert_error(response, 409, "run_finished")


async def test_cancelling_an_unknown_run_is_a_404(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(f"/tasks/runs/{uuid.uuid4()}/cancel")
    assert_error(response, 404)


# -- GET /runs: bounded pages --------------------------------------------------


async def test_listing_runs_leaves_out_arguments_and_results_unless_asked(db_url: str) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http, "echo", "x" * 1000)
        plain = (await http.get("/tasks/runs")).json()["runs"]
        both = (await http.get("/tasks/runs", params={"include": "args,result"})).json()["runs"]
        args = (await http.get("/tasks/runs", params={"include": "args"})).json()["runs"]
    assert [r["id"] for r in plain] == [run_id]
    assert plain[0]["args"] is None and plain[0]["kwargs"] is None
    assert both[0]["args"] == ["x" * 1000] and both[0]["kwargs"] == {}
    assert args[0]["args"] == ["x" * 1000]


@pytest.mark.parametrize("include", ["args,", "secrets", "args,args", "ARGS", ""])
async def test_an_include_this_api_does_not_know_is_a_422(db_url: str, include: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"include": include})
    assert_error(response, 422, "invalid_request")


async def test_a_page_with_arguments_stops_at_max_page_bytes_and_its_cursor_goes_on(
    db_url: str,
) -> None:
    """Ten runs of 100 KB arguments with a 250 KB page budget: pages of two
    (the first run of a page is always listed), every run seen once."""
    async with api(db_url, max_page_bytes=250_000) as (_, http):
        submitted = [await submit(http, "echo", f"{i}" * 100_000) for i in range(10)]
        seen: list[str] = []
        sizes: list[int] = []
        params: dict[str, Any] = {"limit": 500, "include": "args,result"}
        while True:
            response = await http.get("/tasks/runs", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            sizes.append(len(response.content))
            seen += [r["id"] for r in page["runs"]]
            assert all(len(r["args"][0]) == 100_000 for r in page["runs"])
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
    assert sorted(seen) == sorted(submitted) and len(seen) == 10
    assert len(sizes) == 5 and max(sizes) < 250_000, sizes


async def test_a_run_larger_than_max_page_bytes_is_listed_alone(db_url: str) -> None:
    async with api(db_url, max_page_bytes=1000) as (_, http):
        first = await submit(http, "echo", "a" * 5000)
        second = await submit(http, "echo", "b" * 5000)
        page = (await http.get("/tasks/runs", params={"include": "args"})).json()
        rest = (
            await http.get("/tasks/runs", params={"include": "args", "cursor": page["next_cursor"]})
        ).json()
    assert [r["id"] for r in page["runs"]] == [second]
    assert [r["id"] for r in rest["runs"]] == [first] and rest["next_cursor"] is None


@pytest.mark.parametrize(
    "cursor",
    ["0.00000000000000000000000000000000", "1733400000000000.0123456789abcdef0123456789abcdef"],
)
async def test_every_cursor_the_schema_admits_is_accepted(db_url: str, cursor: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.get("/tasks/runs", params={"cursor": cursor})
    assert response.status_code == 200, response.text


async def test_the_cursor_schema_is_the_pattern_the_api_decodes(db_url: str) -> None:
    async with api(db_url) as (_, http):
        schema = (await http.get("/tasks/openapi.json")).json()
    (cursor,) = [p for p in schema["paths"]["/runs"]["get"]["parameters"] if p["name"] == "cursor"]
    assert cursor["schema"]["anyOf"][0]["pattern"] == CURSOR_PATTERN


# -- methods -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/tasks/runs/batch", "POST"),
        ("DELETE", "/tasks/runs/batch", "POST"),
        ("OPTIONS", "/tasks/runs", "GET, POST"),
        ("DELETE", "/tasks/runs", "GET, POST"),
        ("PUT", "/tasks/health", "GET"),
        ("POST", f"/tasks/runs/{uuid.UUID(int=1)}", "GET"),
    ],
)
async def test_a_method_a_path_does_not_take_is_a_405_naming_every_method_it_does(
    db_url: str, method: str, path: str, allow: str
) -> None:
    async with api(db_url) as (_, http):
        response = await http.request(method, path)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allow
