"""How errors leave the mounted API (server/responses.py): every refusal is
the one JSON error body of a class in errors.py, and every route's OpenAPI
declares the statuses its classes answer with. One behaviour per test."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fastapi_bgtasks.errors import (
    ERRORS,
    BadRequest,
    InvalidCursor,
    InvalidRequest,
    RunNotFound,
    StoreUnavailable,
)
from fastapi_bgtasks.server.responses import declare
from fastapi_bgtasks.wire import ErrorBody
from tests.server.apikit import api, assert_error, client, host_app, make_hub, stored_runs

pytestmark = pytest.mark.anyio

BODY_ROUTES = ["/runs", "/runs/batch", "/worker/reports", "/worker/heartbeat"]
NOT_UTF8 = b'{"task": "add", "worker_id": "\xff\xfe w1"}'


def spec() -> dict[str, Any]:
    schema: dict[str, Any] = make_hub("sqlite+aiosqlite:///./never-opened.db").app.app.openapi()
    return schema


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_a_body_that_is_not_utf8_is_a_declared_400_bad_request(
    db_url: str, path: str
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks" + path, content=NOT_UTF8, headers={"Content-Type": "application/json"}
        )
        assert await stored_runs(http) == []
    body = assert_error(response, 400, "bad_request")
    assert body["message"] == "The request body is not valid UTF-8."
    declared = spec()["paths"][path]["post"]["responses"]["400"]
    assert declared["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "`bad_request`" in declared["description"]


async def test_an_unknown_path_is_a_404_of_a_class_in_the_error_table() -> None:
    async with client(host_app(make_hub("sqlite+aiosqlite:///./never-opened.db"))) as http:
        response = await http.get("/tasks/nowhere")
    body = assert_error(response, 404, "not_found")
    assert ERRORS[body["error"]].status_code == 404


async def test_a_wrong_method_is_a_405_of_a_class_in_the_error_table() -> None:
    async with client(host_app(make_hub("sqlite+aiosqlite:///./never-opened.db"))) as http:
        response = await http.delete("/tasks/runs")
    body = assert_error(response, 405, "method_not_allowed")
    assert ERRORS[body["error"]].status_code == 405
    assert "allow" in response.headers


async def test_a_request_that_does_not_match_the_schema_is_an_invalid_request(
    db_url: str,
) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "add", "state": "COMPLETED"})
    body = assert_error(response, 422, InvalidRequest.code)
    assert body["message"] == InvalidRequest().message
    assert {"type", "loc", "msg"} <= set(body["detail"][0])


def test_declare_gives_each_status_the_error_body_and_its_classes_docstrings() -> None:
    responses = declare(RunNotFound, InvalidRequest, InvalidCursor, StoreUnavailable)
    assert sorted(responses) == [404, 422, 503]
    assert all(entry["model"] is ErrorBody for entry in responses.values())
    assert responses[404]["description"] == "`run_not_found`: No run has this id."
    assert responses[422]["description"] == (
        "- `invalid_request`: The request is not valid; see detail for each problem.\n"
        "- `invalid_cursor`: The cursor is not one this API returned."
    )


def test_every_declared_error_names_only_codes_of_that_status_in_the_error_table() -> None:
    wrong = []
    for path, operations in spec()["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                codes = re.findall(r"`(\w+)`", response["description"])
                if not codes or any(
                    code not in ERRORS or ERRORS[code].status_code != int(status) for code in codes
                ):
                    wrong.append(f"{method.upper()} {path} {status}: {response['description']}")
    assert wrong == []


def test_the_400_class_says_what_a_body_that_cannot_be_read_is() -> None:
    assert BadRequest.status_code == 400 and ERRORS["bad_request"] is BadRequest


async def test_a_body_nested_too_deeply_is_a_400_that_says_so(db_url: str) -> None:
    depth = 100_000
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=b'{"task": "echo", "args": [' + b"[" * depth + b"]" * depth + b"]}",
            headers={"Content-Type": "application/json"},
        )
    body = assert_error(response, 400, "bad_request")
    assert body["message"] == "The request body nests too deeply."
