"""The HTTP client of the mounted API, for processes that submit and read
runs without the database: scripts given `BGTASKS_URL`, and tasks running
inside a worker. Errors come back as the package's own exceptions.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

from .errors import PayloadTooLarge, StoreUnavailable, from_response
from .wire import MAX_MAP_CALLS, MapResponse, RunDocument

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["HttpRoute"]


class HttpRoute:
    """Over HTTP to the mounted API: workers, and processes given BGTASKS_URL."""

    def __init__(
        self, url: str, token: str | None, client: httpx.AsyncClient | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self.client = client or httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(30.0, connect=10.0)
        )
        self._headers = headers

    async def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None,
        eta: datetime | None,
        idempotency_key: str | None,
        priority: int,
    ) -> RunDocument:
        body: dict[str, Any] = {"task": task.name, "args": args, "kwargs": kwargs}
        if countdown is not None:
            body["countdown"] = countdown
        if eta is not None:
            body["eta"] = eta.isoformat()
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        if priority:
            body["priority"] = priority
        response = await self._request("POST", "/runs", json=body)
        return RunDocument.model_validate(response.json())

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]:
        if len(calls) > MAX_MAP_CALLS:
            raise PayloadTooLarge(
                f"A map over HTTP takes at most {MAX_MAP_CALLS} calls (POST /runs/batch), "
                f"not {len(calls)}: split the items. Nothing was stored."
            )
        body = {"task": task.name, "calls": [{"args": a, "kwargs": k} for a, k in calls]}
        response = await self._request("POST", "/runs/batch", json=body)
        return MapResponse.model_validate_json(response.content).runs

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        response = await self._request("GET", f"/runs/{run_id}")
        return RunDocument.model_validate(response.json())

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.client.request(
                method, self.url + path, headers=self._headers, **kwargs
            )
        except httpx.HTTPError as exc:
            raise StoreUnavailable(
                f"The task API at {self.url} is unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code < 400:
            return response
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:200]}
        raise from_response(response.status_code, body, self.url + path)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()
