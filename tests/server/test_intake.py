"""The HTTP intake (server/intake.py): `POST /runs`, its idempotency keys and
its refusals, on SQLite and PostgreSQL. One behaviour per test."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.server.apikit import (
    api,
    assert_client_error,
    assert_error,
    stored_runs,
)

pytestmark = pytest.mark.anyio

# -- POST /runs ----------------------------------------------------------------


async def test_submitting_answers_202_with_the_scheduled_run_document(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert response.status_code == 202, response.text
    doc = response.json()
    assert uuid.UUID(doc["id"]).version == 4
    assert doc["task"] == "add"
    assert doc["state"] == "SCHEDULED"
    assert doc["args"] == [1, 2]
    assert doc["kwargs"] == {}
    assert doc["max_attempts"] == 1
    for field in ("created_at", "scheduled_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", doc[field]), doc[field]
    assert doc["started_at"] is None and doc["finished_at"] is None
    assert doc["result"] is None and doc["error"] is None
    assert "Idempotent-Replayed" not in response.headers


async def test_submitted_arguments_are_stored_validated(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": ["1", 2]})
    assert response.status_code == 202, response.text
    assert response.json()["args"] == [1, 2]


async def test_a_countdown_schedules_the_run_in_the_future(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "countdown": 3600}
        )
    assert response.status_code == 202, response.text
    doc = response.json()
    created = datetime.fromisoformat(doc["created_at"])
    scheduled = datetime.fromisoformat(doc["scheduled_at"])
    assert timedelta(minutes=59) < scheduled - created < timedelta(minutes=61)


async def test_an_unknown_task_is_a_404_with_the_json_error_body(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "nope", "args": []})
        assert_error(response, 404, "task_not_found")
        assert await stored_runs(http) == []


async def test_wrong_arguments_are_a_422_with_pydantics_errors_and_nothing_stored(
    db_url: str,
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": ["x", 2]})
        body = assert_error(response, 422)
        assert isinstance(body["detail"], list) and body["detail"]
        assert {"type", "loc", "msg"} <= set(body["detail"][0])
        assert await stored_runs(http) == []


async def test_missing_arguments_are_a_422_and_nothing_stored(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1]})
        assert_error(response, 422)
        assert await stored_runs(http) == []


@pytest.mark.parametrize(
    "field", [{"state": "COMPLETED"}, {"attempt": 5}, {"worker_id": "w"}, {"result": 3}]
)
async def test_unknown_body_fields_are_a_422_and_nothing_stored(
    db_url: str, field: dict[str, Any]
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2], **field})
        assert_error(response, 422)
        assert await stored_runs(http) == []


async def test_malformed_json_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "add", "args": [1, 2]',
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_a_json_body_that_is_not_an_object_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json=["add", 1, 2])
        assert_client_error(response)


async def test_a_non_json_content_type_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "add", "args": [1, 2]}',
            headers={"Content-Type": "text/plain"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_deeply_nested_json_is_a_4xx_json_error(db_url: str) -> None:
    async with api(db_url) as (_, http):
        depth = 100_000
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "echo", "args": [' + b"[" * depth + b"]" * depth + b"]}",
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_a_nan_literal_in_the_body_is_refused_not_stored_as_null(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "echo", "args": [NaN]}',
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_countdown_with_eta_is_a_422_and_nothing_stored(db_url: str) -> None:
    eta = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "countdown": 5, "eta": eta}
        )
        assert_error(response, 422, "invalid_schedule")
        assert await stored_runs(http) == []


async def test_a_naive_eta_is_a_422(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "eta": "2030-01-01T00:00:00"}
        )
        assert_error(response, 422)


async def test_a_task_name_shaped_like_sql_is_just_an_unknown_task(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "' OR 1=1--", "args": []})
        assert_error(response, 404, "task_not_found")


async def test_an_idempotency_key_with_a_nul_character_is_not_a_server_error(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k\x00"}
        )
    assert response.status_code < 500, response.text


# -- idempotency ---------------------------------------------------------------


async def test_a_repeated_idempotency_key_in_the_body_replays_the_stored_run(
    db_url: str,
) -> None:
    body = {"task": "add", "args": [1, 2], "idempotency_key": "order-1"}
    async with api(db_url) as (_, http):
        first = await http.post("/tasks/runs", json=body)
        again = await http.post("/tasks/runs", json=body)
        assert len(await stored_runs(http)) == 1
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_repeated_idempotency_key_header_replays_the_stored_run(db_url: str) -> None:
    body = {"task": "add", "args": [1, 2]}
    headers = {"Idempotency-Key": "order-2"}
    async with api(db_url) as (_, http):
        first = await http.post("/tasks/runs", json=body, headers=headers)
        again = await http.post("/tasks/runs", json=body, headers=headers)
        assert len(await stored_runs(http)) == 1
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]


async def test_a_repeated_idempotency_key_with_other_arguments_is_a_409(db_url: str) -> None:
    async with api(db_url) as (_, http):
        first = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k"}
        )
        assert first.status_code == 202
        response = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 3], "idempotency_key": "k"}
        )
        assert_error(response, 409, "idempotency_conflict")
        runs = await stored_runs(http)
    assert [r["args"] for r in runs] == [[1, 2]]


async def test_an_idempotency_key_is_unique_per_task_only(db_url: str) -> None:
    async with api(db_url) as (_, http):
        first = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2], "idempotency_key": "k"}
        )
        other = await http.post(
            "/tasks/runs", json={"task": "echo", "args": [1], "idempotency_key": "k"}
        )
    assert first.status_code == other.status_code == 202
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
