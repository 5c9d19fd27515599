"""The feed's hand-built `runs` event (server/feed.py) against its schema:
built straight from claimed rows for speed, it must still be exactly a list
of `wire.Delivery`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import anyio
import pytest
from pydantic import TypeAdapter

from fastapi_bgtasks.server.feed import _deliveries, _runs_event
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


async def test_a_feed_whose_runs_trickle_in_claims_once_per_run(db_url: str) -> None:
    """Runs submitted one at a time, each finished before the next: one
    claim per run. The freed credit of a finished run is no reason to claim
    again when the last claim found nothing due (it used to cost an empty
    claim and a read of the next due time per run)."""
    hub = make_hub(db_url, poll_seconds=30)
    async with serving(hub) as app, client(app) as http:
        running = hub.running
        assert running is not None
        store = running.store
        calls: Counter[str] = Counter()
        claim, waiting = store.claim, store.waiting

        async def counted_claim(**options: Any) -> Any:
            calls["claim"] += 1
            return await claim(**options)

        async def counted_waiting(tasks: Any) -> Any:
            calls["waiting"] += 1
            return await waiting(tasks)

        store.claim, store.waiting = counted_claim, counted_waiting  # type: ignore[method-assign]
        send, received = anyio.create_memory_object_stream[Any](10)
        shutdown = anyio.Event()

        async def feed() -> None:
            async for event in _deliveries(hub, running, "w1", ["add"], 10, shutdown):
                await send.send(event)

        async with send, received, anyio.create_task_group() as tg:
            tg.start_soon(feed)
            with anyio.fail_after(10):
                assert (await received.receive()).event == "hello"
                await anyio.sleep(0.3)  # its first claim found nothing: it waits
                for _ in range(5):
                    await submit(http, "add", 1, 2)
                    [delivery] = json.loads(str((await received.receive()).data))
                    report = {"run_id": delivery["id"], "lease_token": delivery["lease_token"],
                              "state": "COMPLETED", "result": 3}  # fmt: skip
                    done = await http.post(
                        "/tasks/worker/reports", json={"worker_id": "w1", "reports": [report]}
                    )
                    assert done.json() == {"outcomes": ["accepted"]}
                await anyio.sleep(0.3)  # the feed heard the last freed credit
            shutdown.set()
    assert calls == {"claim": 1 + 5, "waiting": 1}
