"""Status (server/status.py): reading, listing and cancelling runs over HTTP,
on SQLite and PostgreSQL. One behaviour per test."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

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
