"""The one HTTP client of the mounted API, for processes without the
database: scripts given `BGTASKS_URL` submit and read runs through it, and a
worker takes its feed, reports and heartbeats through it. Every error
response comes back as the package's own exception (`errors.from_response`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from httpx_sse import aconnect_sse
from pydantic import TypeAdapter

from .errors import AccessDenied, BgTasksError, PayloadTooLarge, StoreUnavailable, from_response
from .keepalive import KeepAlive, ProtocolFault, direct_http
from .states import Outcome
from .wire import (
    MAX_MAP_CALLS,
    Delivery,
    HeartbeatResponse,
    Hello,
    MapResponse,
    ReportOutcomes,
    RunDocument,
)

if TYPE_CHECKING:
    from .schedule import Schedule
    from .tasks import Task

__all__ = ["ApiClient", "FeedEvent", "HttpRoute", "reports_body"]

# ("hello", Hello), ("runs", list[Delivery]) or ("bye", None).
FeedEvent = tuple[str, Any]

# A feed's `runs` event, parsed and validated in one call.
_DELIVERIES = TypeAdapter(list[Delivery])


def reports_body(worker_id: str, encoded: Sequence[bytes]) -> bytes:
    """A `ReportBatch` body made of reports already serialised (each
    `Report.model_dump_json()`, UTF-8): each report is serialised once, and
    the body is exactly the bytes a batch budget measured (httpx's `json=`
    would serialise again and escape non-ASCII six-fold)."""
    return b'{"worker_id":%s,"reports":[%s]}' % (json.dumps(worker_id).encode(), b",".join(encoded))


class ApiClient:
    """One `httpx.AsyncClient` to the mounted API at `url` (its mount point,
    e.g. http://127.0.0.1:8000/tasks). `worker_id` is sent with every request
    of a worker (X-Worker-Id); scripts leave it None."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        worker_id: str | None = None,
        timeout: float = 30.0,
        limits: httpx.Limits | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.worker_id = worker_id
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if worker_id is not None:
            headers["X-Worker-Id"] = worker_id
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=limits or httpx.Limits(),
        )
        # A worker's reports: one connection of their own, one write each,
        # when the app is plain HTTP reached directly.
        self._reports_link = (
            KeepAlive(self.url, headers, timeout=timeout)
            if worker_id is not None and direct_http(self.url)
            else None
        )

    async def aclose(self) -> None:
        if self._reports_link is not None:
            await self._reports_link.aclose()
        await self.http.aclose()

    # -- runs --------------------------------------------------------------

    async def submit(
        self,
        task: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> RunDocument:
        body = submit_body(task, args, kwargs, countdown, eta, idempotency_key, priority)
        response = await self._request("POST", "/runs", json=body)
        return RunDocument.model_validate_json(response.content)

    async def submit_many(
        self, task: str, calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]:
        if len(calls) > MAX_MAP_CALLS:
            raise PayloadTooLarge(
                f"A map over HTTP takes at most {MAX_MAP_CALLS} calls (POST /runs/batch), "
                f"not {len(calls)}: split the items. Nothing was stored."
            )
        response = await self._request("POST", "/runs/batch", json=map_body(task, calls))
        return MapResponse.model_validate_json(response.content).runs

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        response = await self._request("GET", f"/runs/{run_id}")
        return RunDocument.model_validate_json(response.content)

    # -- a worker's routes -------------------------------------------------

    async def feed(
        self, tasks: list[str], slots: int, signatures: list[str] | None = None
    ) -> AsyncIterator[FeedEvent]:
        """The feed's events until the app says bye. Raises AccessDenied
        (do not retry), another BgTasksError or ValueError (retry).
        `signatures`: `name:fingerprint` of each task, for the app to compare."""
        # The server pings every 5 s: 20 s of silence means a dead link.
        timeout = httpx.Timeout(10.0, read=20.0)
        try:
            async with aconnect_sse(
                self.http,
                "GET",
                f"{self.url}/feed",
                params={"task": tasks, "slots": slots, "signature": signatures or []},
                timeout=timeout,
            ) as source:
                response = source.response
                if response.status_code != 200:
                    await response.aread()
                    raise self._worker_error(response)
                async for sse in source.aiter_sse():
                    if sse.event == "hello":
                        yield "hello", Hello.model_validate_json(sse.data)
                    elif sse.event == "runs":
                        yield "runs", _DELIVERIES.validate_json(sse.data)
                    elif sse.event == "bye":
                        yield "bye", None
                        return
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def reports(self, encoded: Sequence[bytes]) -> list[Outcome]:
        """Post reports already serialised (see `reports_body`); one outcome
        per report, in order."""
        assert self.worker_id is not None, "reports are a worker's"
        body = reports_body(self.worker_id, encoded)
        if self._reports_link is None:
            response = await self._request(
                "POST",
                "/worker/reports",
                worker=True,
                content=body,
                headers={"Content-Type": "application/json"},
            )
            status, content = response.status_code, response.content
        else:
            try:
                reply = await self._reports_link.post("/worker/reports", body)
            except (OSError, ProtocolFault) as exc:  # TimeoutError is an OSError
                raise self._unreachable(exc) from exc
            status, content = reply.status, reply.body
            if status >= 400:
                raise self._worker_error_of(status, content, self.url + "/worker/reports")
        return [Outcome(o) for o in ReportOutcomes.model_validate_json(content).outcomes]

    async def heartbeat(self, held: list[tuple[uuid.UUID, str]]) -> HeartbeatResponse:
        body = {
            "worker_id": self.worker_id,
            "runs": [{"run_id": str(run_id), "lease_token": token} for run_id, token in held],
        }
        response = await self._request("POST", "/worker/heartbeat", worker=True, json=body)
        return HeartbeatResponse.model_validate_json(response.content)

    # -- errors ------------------------------------------------------------

    async def _request(
        self, method: str, path: str, *, worker: bool = False, **kwargs: Any
    ) -> httpx.Response:
        if "json" in kwargs:
            # Compact UTF-8, as the app measures arguments: httpx before 0.28
            # escapes non-ASCII six-fold and adds spaces.
            kwargs["content"] = json.dumps(
                kwargs.pop("json"), ensure_ascii=False, separators=(",", ":")
            ).encode()
            kwargs["headers"] = {**kwargs.get("headers", {}), "Content-Type": "application/json"}
        try:
            response = await self.http.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code < 400:
            return response
        raise self._worker_error(response) if worker else self._error(response)

    def _unreachable(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(
            f"The task API at {self.url} is unreachable: {type(exc).__name__}: {exc}"
        )

    def _error(self, response: httpx.Response) -> BgTasksError:
        return _error_of(response.status_code, response.content, str(response.request.url))

    def _worker_error(self, response: httpx.Response) -> BgTasksError:
        return self._worker_error_of(
            response.status_code, response.content, str(response.request.url)
        )

    def _worker_error_of(self, status: int, content: bytes, url: str) -> BgTasksError:
        """As `_error`; a refused credential (401, or 403 from a proxy in
        front of the app) says which setting to check: the worker stops."""
        error = _error_of(status, content, url)
        if isinstance(error, AccessDenied) or status == 403:
            return AccessDenied(
                f"{url} refused this worker ({status}): "
                f"{error.message} Check --token / BGTASKS_TOKEN."
            )
        return error


def _error_of(status: int, content: bytes, url: str) -> BgTasksError:
    """The package's exception for an error response's status and body."""
    try:
        body = json.loads(content)
    except ValueError:  # incl. UnicodeDecodeError
        body = {"message": content.decode("utf-8", "replace")[:200]}
    return from_response(status, body, url)


class HttpRoute:
    """The hub's route over HTTP (a script given BGTASKS_URL, a task calling
    another from inside a worker): submit and read runs through an
    `ApiClient`, its own unless one is given."""

    def __init__(self, url: str, token: str | None, client: ApiClient | None = None) -> None:
        self.url = url.rstrip("/")
        self._owns_client = client is None
        self.client = client or ApiClient(url, token)

    async def submit(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        schedule: Schedule,
    ) -> RunDocument:
        return await self.client.submit(
            task.name,
            args,
            kwargs,
            countdown=schedule.countdown,
            eta=schedule.eta,
            idempotency_key=schedule.idempotency_key,
            priority=schedule.priority,
        )

    async def submit_many(
        self, task: Task[Any, Any], calls: list[tuple[list[Any], dict[str, Any]]]
    ) -> list[RunDocument]:
        return await self.client.submit_many(task.name, calls)

    async def read_run(self, run_id: uuid.UUID) -> RunDocument:
        return await self.client.read_run(run_id)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


# The request bodies, built by hand (no model round trip on the submit path);
# tests/test_wire_parity.py ties each to its schema in wire.py.


def submit_body(
    task: str,
    args: list[Any],
    kwargs: dict[str, Any],
    countdown: float | None = None,
    eta: datetime | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
) -> dict[str, Any]:
    """The body of `POST /runs` (`wire.SubmitRequest`), defaults left out."""
    body: dict[str, Any] = {"task": task, "args": args, "kwargs": kwargs}
    if countdown is not None:
        body["countdown"] = countdown
    if eta is not None:
        body["eta"] = eta.isoformat()
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    if priority:
        body["priority"] = priority
    return body


def map_body(task: str, calls: list[tuple[list[Any], dict[str, Any]]]) -> dict[str, Any]:
    """The body of `POST /runs/batch` (`wire.MapRequest`)."""
    return {"task": task, "calls": [{"args": a, "kwargs": k} for a, k in calls]}
