"""The request bodies the HTTP client builds by hand are exactly what their
schemas in wire.py describe (the feed's deliveries and the worker's reports
have their own parity tests in tests/server/ and tests/worker/)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from fastapi_bgtasks.client import map_body, submit_body
from fastapi_bgtasks.wire import MapRequest, SubmitRequest

ARGS: list[Any] = [1, "é\u2028\x00", {"nested": [None, 1.5, 2**70]}]
KWARGS: dict[str, Any] = {"when": "2026-12-05T10:00:00Z", "flag": True}


@pytest.mark.parametrize(
    "schedule",
    [
        {},
        {"countdown": 2.5},
        {"eta": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)},
        {"eta": datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))},
        {"idempotency_key": "order-42"},
        {"priority": -7},
        {"countdown": 0.0, "idempotency_key": "k", "priority": 2**31 - 1},
    ],
)
def test_the_submit_body_is_a_submit_request_with_the_same_values(
    schedule: dict[str, Any],
) -> None:
    body = json.loads(json.dumps(submit_body("t", ARGS, KWARGS, **schedule)))
    request = SubmitRequest.model_validate(body)
    expected = SubmitRequest(task="t", args=ARGS, kwargs=KWARGS, **schedule)
    assert request == expected
    assert set(body) == {"task", "args", "kwargs", *schedule}  # defaults left out


def test_the_map_body_is_a_map_request_with_the_same_calls() -> None:
    calls = [(ARGS, KWARGS), ([], {}), ([2], {"x": None})]
    body = json.loads(json.dumps(map_body("t", calls)))
    request = MapRequest.model_validate(body)
    assert [(c.args, c.kwargs) for c in request.calls] == calls
    assert body == request.model_dump(mode="json")
