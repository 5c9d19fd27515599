"""④ The worker's side of the wire: the feed (SSE in), reports and heartbeats
(JSON out). HTTP only: a worker holds a URL and a token, never database
credentials.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from ..errors import AccessDenied, RemoteError
from ..wire import Delivery, HeartbeatResponse, Hello, ReportOutcomes

__all__ = ["FeedEvent", "WorkerClient"]

FeedEvent = tuple[str, Any]


class WorkerClient:
    def __init__(self, url: str, token: str | None, worker_id: str, *, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.worker_id = worker_id
        headers = {"X-Worker-Id": worker_id}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        )
        self.request_timeout = timeout
        self.feed_asked_at = time.monotonic()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def feed(self, tasks: list[str], slots: int) -> AsyncIterator[FeedEvent]:
        """The feed's events as ("hello", Hello), ("runs", [Delivery]), ("bye", None).

        Raises AccessDenied (do not retry), RemoteError or httpx errors (retry).
        """
        # The server pings every 5 s: 20 s of silence means a dead link.
        timeout = httpx.Timeout(10.0, read=20.0)
        # Before asking: the hello is written later by the app's clock, so
        # hello.clock - asked_at bounds the clocks' offset from above.
        self.feed_asked_at = time.monotonic()
        async with aconnect_sse(
            self.http,
            "GET",
            f"{self.url}/feed",
            params={"task": tasks, "slots": slots},
            timeout=timeout,
        ) as source:
            response = source.response
            if response.status_code != 200:
                await response.aread()
                raise _error(response)
            async for sse in source.aiter_sse():
                if sse.event == "hello":
                    yield "hello", Hello.model_validate_json(sse.data)
                elif sse.event == "runs":
                    yield "runs", [Delivery.model_validate(d) for d in json.loads(sse.data)]
                elif sse.event == "bye":
                    yield "bye", None
                    return

    async def post_reports(self, reports: list[bytes]) -> list[str]:
        """Post reports already serialised (each `Report.model_dump_json()`,
        UTF-8): the body is exactly the bytes the runtime budgeted for, and
        each report is serialised once (httpx's json= would also escape
        non-ASCII 6-fold)."""
        body = b'{"worker_id":%s,"reports":[%s]}' % (
            json.dumps(self.worker_id).encode(),
            b",".join(reports),
        )
        response = await self.http.post(
            f"{self.url}/worker/reports",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        if response.status_code != 200:
            raise _error(response)
        return list(ReportOutcomes.model_validate_json(response.content).outcomes)

    async def heartbeat(self, held: list[tuple[uuid.UUID, str]]) -> HeartbeatResponse:
        body = {
            "worker_id": self.worker_id,
            "runs": [{"run_id": str(run_id), "lease_token": token} for run_id, token in held],
        }
        response = await self.http.post(
            f"{self.url}/worker/heartbeat", json=body, timeout=self.request_timeout
        )
        if response.status_code != 200:
            raise _error(response)
        return HeartbeatResponse.model_validate_json(response.content)


def _error(response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:200]}
    if not isinstance(body, dict):
        body = {"message": str(body)[:200]}
    if response.status_code in (401, 403):
        return AccessDenied(
            f"{response.request.url} refused this worker ({response.status_code}): "
            f"{body.get('message', '')} Check --token / BGTASKS_TOKEN."
        )
    return RemoteError(response.status_code, body, str(response.request.url))
