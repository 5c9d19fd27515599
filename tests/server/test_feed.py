"""The feed's hand-built `runs` event (server/feed.py) against its schema:
built straight from claimed rows for speed, it must still be exactly a list
of `wire.Delivery`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter

from fastapi_bgtasks.server.feed import _runs_event
from fastapi_bgtasks.wire import Delivery
from tests.server.apikit import client, make_hub, serving, submit

pytestmark = pytest.mark.anyio

DELIVERIES = TypeAdapter(list[Delivery])
ARGUMENTS: list[Any] = [
    "plain",
    "ünïcødé ✓ 漢字 \U0001f600",
    {"nested": [1, 2.5, None, True, {"deep": "x"}]},
    [],
    None,
    -(2**53),
]


def bounded(value: Any = None) -> Any:
    return value


async def claimed_rows(db_url: str) -> list[dict[str, Any]]:
    """Runs of a task without a timeout and of one with, as the feed claims them."""
    hub = make_hub(db_url)
    hub.task(timeout_seconds=1.5)(bounded)
    async with serving(hub) as app, client(app) as http:
        for value in ARGUMENTS:
            await submit(http, "echo", value)
            await submit(http, "bounded", value)
        assert hub.running is not None
        rows = await hub.running.store.claim(
            worker_id="w1", tasks=["bounded", "echo"], slots=100, lease_seconds=30
        )
    assert len(rows) == 2 * len(ARGUMENTS)
    assert {row["timeout_seconds"] for row in rows} == {None, 1.5}
    return rows


@pytest.mark.parametrize("leased_at", [None, 81234.517], ids=["resent", "fresh"])
async def test_the_runs_event_is_a_list_of_deliveries_that_round_trips_unchanged(
    db_url: str, leased_at: float | None
) -> None:
    rows = await claimed_rows(db_url)
    event = _runs_event(rows, leased_at)
    assert event.event == "runs"
    written = json.loads(str(event.data))
    deliveries = DELIVERIES.validate_json(str(event.data))
    assert [d.leased_at for d in deliveries] == [leased_at] * len(rows)
    assert [set(item) for item in written] == [set(Delivery.model_fields)] * len(rows)
    assert json.loads(DELIVERIES.dump_json(deliveries)) == written
    assert sorted(json.dumps(d["args"]) for d in written) == sorted(
        json.dumps([value]) for value in ARGUMENTS * 2
    )
