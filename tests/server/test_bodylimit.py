"""The body limit (server/bodylimit.py): bodies over `max_body_bytes` are
refused with 413 by Content-Length or while streamed, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.server.apikit import (
    api,
    assert_client_error,
    assert_error,
    stored_runs,
)

pytestmark = pytest.mark.anyio

# -- body limit ----------------------------------------------------------------


async def test_a_body_over_max_body_bytes_with_content_length_is_a_413(db_url: str) -> None:
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post("/tasks/runs", json={"task": "echo", "args": ["x" * 2000]})
        assert "content-length" in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert await stored_runs(http) == []


def chunked(body: bytes, size: int = 100) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), size):
            yield body[start : start + size]

    return chunks


async def test_a_streamed_body_under_max_body_bytes_is_accepted(db_url: str) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 500 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
    assert "content-length" not in response.request.headers
    assert response.status_code == 202, response.text


async def test_a_streamed_body_over_max_body_bytes_is_a_413(db_url: str) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 2000 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "payload_too_large")
        assert await stored_runs(http) == []


async def test_a_streamed_body_over_max_body_bytes_is_refused_and_stores_nothing(
    db_url: str,
) -> None:
    body = b'{"task": "echo", "args": ["' + b"x" * 2000 + b'"]}'
    async with api(db_url, max_body_bytes=1000) as (_, http):
        response = await http.post(
            "/tasks/runs",
            content=chunked(body)(),
            headers={"Content-Type": "application/json"},
        )
        assert_client_error(response)
        assert await stored_runs(http) == []


async def test_arguments_of_exactly_max_args_bytes_can_be_submitted_over_http(db_url: str) -> None:
    """By default the body limit is max_args_bytes plus room for the envelope."""
    limit = 1024 * 1024  # the default max_args_bytes
    value = "é" * ((limit - len('[[""],{}]')) // 2)  # two UTF-8 bytes each
    # Sent as compact UTF-8 JSON, as stored: how a client encodes its body
    # (httpx before 0.28 escapes "é" as six bytes) is not under test.
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/runs", **_compact({"task": "echo", "args": [value]}))
        assert response.status_code == 202, response.text
        over = await http.post("/tasks/runs", **_compact({"task": "echo", "args": [value + "éx"]}))
        assert_error(over, 413, "payload_too_large")
        assert len(await stored_runs(http)) == 1


def _compact(body: Any) -> dict[str, Any]:
    """A JSON body as compact UTF-8, the way the store measures arguments."""
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return {"content": content, "headers": {"Content-Type": "application/json"}}
