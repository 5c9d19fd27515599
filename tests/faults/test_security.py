"""Security scenarios S1-S6 (RELIABILITY.md §3.2), adapted to DESIGN.md §3's
access model: one worker bearer token (BGTASKS_TOKEN), the host's `auth=`
dependency for operators, and run ids as capabilities.

Requests that end are sent in process (httpx's ASGI transport, as in
tests/server/, whose cases are not repeated here); event streams,
streamed bodies, the app's memory and per-client throttling are tested over
a real uvicorn serving tests/faults/secapp.py. Each category's figures
(§3.3) are written to ARTIFACTS/security-<category>.json and, summed, to
ARTIFACTS/security.json.
"""

from __future__ import annotations

import base64
import codecs
import itertools
import json
import pickle
import select
import socket
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import asyncpg
import httpx
import psutil
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException

from fastapi_bgtasks import BgTasks
from tests.conftest import PG_ADMIN
from tests.faults.checker import ARTIFACTS
from tests.harness.procs import Proc, start_app

pytestmark = pytest.mark.anyio

TOKEN = "sec-token-6c1f0d2a9b7e4f3c8a5d"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ADMIN = {"X-Admin": "yes"}
JSON = {"Content-Type": "application/json"}
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("203.0.113.9", 1234)
ERROR_KEYS = {"error", "message", "detail"}
DOCUMENT_KEYS = {
    "id",
    "task",
    "state",
    "attempt",
    "max_attempts",
    "args",
    "kwargs",
    "created_at",
    "scheduled_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "worker_id",
    "reason",
    "waiting_for",
}
MiB = 1024 * 1024


def echo(value: Any = None) -> Any:
    return value


async def add(a: int, b: int) -> int:
    return a + b


def check_admin(x_admin: str | None = Header(default=None)) -> None:
    """The host's operator check: a header only operators send."""
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="Operators only.")


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- figures -------------------------------------------------------------------


def is_json_error(response: httpx.Response) -> bool:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and set(body) == ERROR_KEYS
        and isinstance(body["message"], str)
        and bool(body["message"])
    )


@dataclass
class Tally:
    """One test's count of bad inputs and how they were answered (§3.3)."""

    category: str
    bad_inputs_tried: int = 0
    rejected_cleanly: int = 0
    accepted_as_valid: int = 0
    server_errors: int = 0
    unclean_rejections: int = 0
    wrongly_accepted: int = 0
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def saw(self, what: str, response: httpx.Response) -> httpx.Response:
        """Count one bad input by its answer: a 4xx with the JSON error body is
        a clean rejection, a 5xx a server error, a 2xx accepted as valid (the
        test then checks it was harmless and calls `wrong` if not)."""
        self.bad_inputs_tried += 1
        status = response.status_code
        if status >= 500:
            self.server_errors += 1
            self.problems.append(f"{what}: {status} {response.text[:200]!r}")
        elif status >= 400:
            if is_json_error(response):
                self.rejected_cleanly += 1
            else:
                self.unclean_rejections += 1
                self.problems.append(f"{what}: {status} without the JSON error body")
        else:
            self.accepted_as_valid += 1
        return response

    def dropped(self, what: str, exc: BaseException) -> None:
        self.bad_inputs_tried += 1
        self.server_errors += 1
        self.problems.append(f"{what}: connection dropped ({type(exc).__name__}: {exc})")

    def wrong(self, what: str) -> None:
        self.wrongly_accepted += 1
        self.problems.append(f"wrongly accepted: {what}")

    def assert_clean(self) -> None:
        bad = (self.server_errors, self.unclean_rejections, self.wrongly_accepted)
        assert bad == (0, 0, 0), self.problems


COUNTS = (
    "bad_inputs_tried",
    "rejected_cleanly",
    "accepted_as_valid",
    "server_errors",
    "unclean_rejections",
    "wrongly_accepted",
)


class Figures:
    def __init__(self) -> None:
        self.tallies: list[tuple[str, Tally]] = []

    def tally(self, category: str, test: str) -> Tally:
        tally = Tally(category)
        self.tallies.append((test, tally))
        return tally

    def write(self) -> None:
        categories: dict[str, dict[str, Any]] = {}
        for test, tally in self.tallies:
            entry = categories.setdefault(tally.category, {**dict.fromkeys(COUNTS, 0), "tests": []})
            for name in COUNTS:
                entry[name] += getattr(tally, name)
            entry["tests"].append({"test": test, **asdict(tally)})
        totals = {name: sum(c[name] for c in categories.values()) for name in COUNTS}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for category, entry in categories.items():
            (ARTIFACTS / f"security-{category}.json").write_text(json.dumps(entry, indent=2))
        summary = {
            "categories": {
                c: {k: v for k, v in e.items() if k != "tests"} for c, e in categories.items()
            },
            "totals": totals,
            # Server errors and wrong acceptances come from the xfail tests, each a known bug.
            "findings": sorted(
                {
                    f"{tally.category}: {test.split('[')[0]}"
                    for test, tally in self.tallies
                    if tally.server_errors or tally.wrongly_accepted or tally.unclean_rejections
                }
            ),
        }
        (ARTIFACTS / "security.json").write_text(json.dumps(summary, indent=2))


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    collected.write()


@pytest.fixture
def tally(figures: Figures, request: pytest.FixtureRequest) -> Any:
    def make(category: str) -> Tally:
        return figures.tally(category, request.node.name)

    return make


# -- in process: the mounted app over httpx's ASGI transport --------------------


def make_hub(db_url: str, **options: Any) -> BgTasks:
    # One reaper pass, at start-up (see `settle`).
    options.setdefault("reaper_seconds", 3600)
    hub = BgTasks(db_url, **options)
    hub.task(echo)
    hub.task(add)
    return hub


def client(
    app: Any, *, remote: bool = False, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(
        app=app, client=REMOTE if remote else LOOPBACK, raise_app_exceptions=False
    )
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)


async def settle(hub: BgTasks) -> None:
    """Wait out the reaper's start-up pass: leaving a SQLite lifespan while it
    is mid-statement hangs the loop (see tests/server/apikit.py)."""
    assert hub.running is not None
    if not hub.running.store.is_pg:
        for _ in range(2):
            await hub.running.store.reap_expired_runs()


async def join_connection_threads() -> None:
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)") and thread.is_alive():
            await anyio.to_thread.run_sync(thread.join, 10)


@asynccontextmanager
async def serving(hub: BgTasks) -> AsyncIterator[FastAPI]:
    app = FastAPI(lifespan=hub.lifespan)
    app.mount("/tasks", hub.app)
    try:
        async with hub.lifespan(app):
            await settle(hub)
            yield app
    finally:
        await join_connection_threads()


@asynccontextmanager
async def api(db_url: str, **options: Any) -> AsyncIterator[tuple[BgTasks, httpx.AsyncClient]]:
    """A hub with `echo` and `add`, served, and a loopback client."""
    hub = make_hub(db_url, **options)
    async with serving(hub) as app, client(app) as http:
        yield hub, http


async def submit(http: httpx.AsyncClient, task: str = "echo", *args: Any, **kw: Any) -> str:
    response = await http.post("/tasks/runs", json={"task": task, "args": list(args)}, **kw)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def claim(hub: BgTasks, run_id: str, task: str = "echo", worker_id: str = "w1") -> str:
    """Lease `run_id` (the only due run of `task`) as the feed does; its lease token."""
    assert hub.running is not None
    rows = await hub.running.store.claim(
        worker_id=worker_id, tasks=[task], slots=1, lease_seconds=30
    )
    assert [str(r["id"]) for r in rows] == [run_id]
    return str(rows[0]["lease_token"])


async def stored(hub: BgTasks, run_id: str) -> dict[str, Any]:
    assert hub.running is not None
    row = await hub.running.store.get_run(uuid.UUID(run_id))
    assert row is not None
    return row


async def run_count(hub: BgTasks) -> int:
    assert hub.running is not None
    rows = await hub.running.store.list_runs(state=None, task=None, limit=100_000, cursor=None)
    return len(rows)


def report_body(
    run_id: str, lease_token: str, state: str = "COMPLETED", **fields: Any
) -> dict[str, Any]:
    report = {"run_id": run_id, "lease_token": lease_token, "state": state, **fields}
    return {"worker_id": "w1", "reports": [report]}


# -- S1: worker routes need the token; every route is accounted for ------------

NEAR_MISSES: dict[str, dict[str, Any]] = {
    "operator credential": {"headers": ADMIN},
    "token minus a byte": {"headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}},
    "token plus a byte": {"headers": {"Authorization": f"Bearer {TOKEN}x"}},
    "token upper-cased": {"headers": {"Authorization": f"Bearer {TOKEN.upper()}"}},
    "token quoted": {"headers": {"Authorization": f'Bearer "{TOKEN}"'}},
    "token then junk": {"headers": {"Authorization": f"Bearer {TOKEN} x"}},
    "token in the query": {"params": {"token": TOKEN, "access_token": TOKEN}},
    "token in a cookie": {"headers": {"Cookie": f"token={TOKEN}; access_token={TOKEN}"}},
    "token in other headers": {"headers": {"X-Api-Key": TOKEN, "X-BgTasks-Token": TOKEN}},
    "scheme only": {"headers": {"Authorization": "Bearer"}},
}


async def test_worker_routes_refuse_near_miss_credentials_and_change_nothing(
    db_url: str, tally: Any
) -> None:
    figures = tally("auth")
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as remote:
        run_id = await submit(remote, "echo", "secret", headers=ADMIN)
        lease_token = await claim(hub, run_id)
        before = await stored(hub, run_id)
        requests = {
            "/tasks/worker/reports": report_body(run_id, lease_token, result="forged"),
            "/tasks/worker/heartbeat": {
                "worker_id": "w1",
                "runs": [{"run_id": run_id, "lease_token": lease_token}],
            },
        }
        for name, credential in NEAR_MISSES.items():
            for path, body in requests.items():
                response = await remote.post(path, json=body, **credential)
                figures.saw(f"{name} on {path}", response)
                assert response.status_code == 401, (name, path, response.text)
                assert response.json()["error"] == "unauthorized"
        after = await stored(hub, run_id)
        if after != before:
            figures.wrong(f"a refused request changed the run: {before} -> {after}")
        # The control: the right token is served by the same routes.
        beat = await remote.post(
            "/tasks/worker/heartbeat", json=requests["/tasks/worker/heartbeat"], headers=BEARER
        )
        assert beat.status_code == 200 and beat.json()["renewed"] == [run_id], beat.text
    figures.assert_clean()


ROUTE_ACCESS = {
    ("POST", "/runs"): "operator",
    ("POST", "/runs/batch"): "operator",
    # The 405 of /runs/batch for other methods (else GET would reach /runs/{run_id}).
    **{(m, "/runs/batch"): "operator" for m in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS")},
    ("GET", "/runs"): "operator",
    ("GET", "/runs/{run_id}"): "capability",
    ("GET", "/runs/{run_id}/history"): "operator",
    ("POST", "/runs/{run_id}/cancel"): "operator",
    ("GET", "/runs/{run_id}/events"): "capability",
    ("GET", "/feed"): "worker",
    ("POST", "/worker/reports"): "worker",
    ("POST", "/worker/heartbeat"): "worker",
    ("GET", "/health"): "public",
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/redoc"): "public",
}


def leaf_routes(routes: list[Any]) -> Iterator[Any]:
    """Routes with included routers expanded (as in tests/server/test_app.py)."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            yield from leaf_routes(candidates())
        else:
            yield route


async def test_every_route_of_the_mounted_app_answers_an_anonymous_client_by_its_class(
    db_url: str, tally: Any
) -> None:
    """The inventory walks the host app's routes into the mount and calls each
    one with no credential from a remote address: worker and operator routes
    answer 401, capability routes serve the redacted document, nothing changes."""
    from starlette.routing import Mount

    figures = tally("auth")
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as remote:
        mounts = [r for r in app.routes if isinstance(r, Mount) and r.app is hub.app]
        assert [m.path for m in mounts] == ["/tasks"]
        found = {
            (method, route.path)
            for route in leaf_routes(hub.app.app.routes)
            for method in (getattr(route, "methods", None) or {"WEBSOCKET"}) - {"HEAD"}
        }
        assert found == set(ROUTE_ACCESS), "classify every new route in ROUTE_ACCESS"

        leased = await submit(remote, "add", 1, 2, headers=ADMIN)
        lease_token = await claim(hub, leased, task="add")
        # Finished, so its event stream ends (httpx's ASGI transport waits for the end).
        finished = await submit(remote, "echo", "secret-arg", headers=ADMIN)
        cancel = await remote.post(f"/tasks/runs/{finished}/cancel", headers=ADMIN)
        assert cancel.status_code == 200, cancel.text
        before = [await stored(hub, leased), await stored(hub, finished), await run_count(hub)]
        bodies: dict[tuple[str, str], dict[str, Any]] = {
            ("POST", "/runs"): {"json": {"task": "echo", "args": [1]}},
            ("POST", "/runs/batch"): {"json": {"task": "echo", "calls": [{"args": [1]}]}},
            ("POST", "/worker/reports"): {"json": report_body(leased, lease_token)},
            ("POST", "/worker/heartbeat"): {
                "json": {"worker_id": "w1", "runs": [{"run_id": leased, "lease_token": "x"}]}
            },
            ("GET", "/feed"): {
                "params": {"task": "echo", "slots": 1},
                "headers": {"X-Worker-Id": "w1"},
            },
        }
        for (method, path), access in sorted(ROUTE_ACCESS.items()):
            url = "/tasks" + path.replace("{run_id}", finished)
            with anyio.fail_after(10):  # an accepted feed would stream forever
                response = await remote.request(method, url, **bodies.get((method, path), {}))
            if access in ("worker", "operator"):
                figures.saw(f"anonymous {method} {path}", response)
                assert response.status_code == 401, (method, path, response.text)
            else:
                assert response.status_code == 200, (method, path, response.text)
            if access == "capability":
                assert "secret-arg" not in response.text
        redacted = (await remote.get(f"/tasks/runs/{finished}")).json()
        assert redacted["args"] is None and redacted["kwargs"] is None
        after = [await stored(hub, leased), await stored(hub, finished), await run_count(hub)]
        if after != before:
            figures.wrong("an anonymous request changed the store")
    figures.assert_clean()


# -- S2: run ids are unguessable capabilities ------------------------------------


def uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    value = (ms << 80) | (0x7 << 76) | (uuid.uuid4().int & ((1 << 76) - 1))
    value = (value & ~(0xC << 60)) | (0x8 << 60)  # RFC 4122 variant
    return uuid.UUID(int=value)


async def test_run_ids_are_random_uuid4_with_no_sequence(db_url: str) -> None:
    async with api(db_url) as (hub, _):
        task = hub.tasks["add"]
        ids = [(await task.delay(i, i)).id for i in range(1000)]
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {4}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    # The 122 random bits: each set in about half of the ids.
    random_bits = [b for b in range(128) if b not in (76, 77, 78, 79, 62, 63)]
    for bit in random_bits:
        share = sum((i.int >> bit) & 1 for i in ids) / len(ids)
        assert 0.35 < share < 0.65, (bit, share)
    # No order: consecutive ids rise about half of the time and differ in
    # about half of their random bits.
    rises = sum(a.int < b.int for a, b in itertools.pairwise(ids)) / (len(ids) - 1)
    assert 0.4 < rises < 0.6, rises
    distance = statistics.mean(bin(a.int ^ b.int).count("1") for a, b in itertools.pairwise(ids))
    assert 55 < distance < 67, distance


async def test_unknown_ids_of_any_version_are_404_and_indistinguishable(
    db_url: str, tally: Any
) -> None:
    figures = tally("bola")
    async with api(db_url) as (_, http):
        real = await submit(http, "echo", "x")
        probes = [str(uuid.uuid4()) for _ in range(1000)]
        started = time.monotonic()
        bodies = []
        for probe in probes:
            response = figures.saw("random uuid4", await http.get(f"/tasks/runs/{probe}"))
            assert response.status_code == 404, response.text
            bodies.append(response.json())
        figures.extra["probe_seconds"] = round(time.monotonic() - started, 3)
        assert {b["error"] for b in bodies} == {"run_not_found"}
        assert {b["detail"] for b in bodies} == {None}

        near_miss = real[:-1] + ("0" if real[-1] != "0" else "1")
        others = {
            "uuid1": str(uuid.uuid1()),
            "uuid7": str(uuid7()),
            "uuid3": str(uuid.uuid3(uuid.NAMESPACE_URL, real)),
            "uuid5": str(uuid.uuid5(uuid.NAMESPACE_URL, real)),
            "nil": str(uuid.UUID(int=0)),
            "max": str(uuid.UUID(int=(1 << 128) - 1)),
            "near miss of a real id": near_miss,
        }
        oracle = 0
        routes = [("GET", ""), ("GET", "/events"), ("GET", "/history"), ("POST", "/cancel")]
        for method, suffix in routes:

            async def answer(run_id: str, method: str = method, suffix: str = suffix) -> Any:
                with anyio.fail_after(10):
                    response = await http.request(method, f"/tasks/runs/{run_id}{suffix}")
                figures.saw(f"{method} {suffix} of {run_id}", response)
                assert response.status_code == 404, (run_id, suffix, response.text)
                body = response.json()
                return {**body, "message": body["message"].replace(run_id, "<id>")}

            # "Missing" reads the same whatever the id is, and however near a real one.
            reference = await answer(str(uuid.uuid4()))
            for other in others.values():
                oracle += await answer(other) != reference
        figures.extra["existence_oracle"] = oracle
        malformed = ["1", "%2e%2e", "x" * 37, real + "0", "%00", "' OR 1=1--"]
        for name in malformed:
            response = figures.saw(f"malformed id {name!r}", await http.get(f"/tasks/runs/{name}"))
            assert response.status_code in (404, 422), (name, response.text)
    assert oracle == 0
    figures.assert_clean()


async def failed_run(hub: BgTasks, admin: httpx.AsyncClient) -> str:
    """A FAILED run of `echo` with secret arguments and a traceback."""
    response = await admin.post(
        "/tasks/runs", json={"task": "echo", "kwargs": {"value": "secret-arg"}}
    )
    assert response.status_code == 202, response.text
    run_id = str(response.json()["id"])
    lease_token = await claim(hub, run_id)
    error = {"type": "ValueError", "message": "boom", "traceback": "secret-traceback frames"}
    reported = await admin.post(
        "/tasks/worker/reports",
        json=report_body(run_id, lease_token, "FAILED", error=error),
        headers=BEARER,
    )
    assert reported.json() == {"outcomes": ["accepted"]}, reported.text
    return run_id


async def test_a_capability_reader_gets_only_allow_listed_fields(db_url: str, tally: Any) -> None:
    figures = tally("bola")
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True, headers=ADMIN) as admin:
        run_id = await failed_run(hub, admin)
        full = (await admin.get(f"/tasks/runs/{run_id}")).json()
        assert full["kwargs"] == {} and full["args"] == ["secret-arg"]
        assert full["error"]["traceback"] == "secret-traceback frames"
        readers = {
            "anonymous remote": client(app, remote=True),
            "anonymous loopback": client(app),
            "wrong operator header": client(app, remote=True, headers={"X-Admin": "no"}),
            "wrong bearer": client(app, remote=True, headers={"Authorization": "Bearer nope"}),
        }
        for name, reader in readers.items():
            async with reader:
                response = await reader.get(f"/tasks/runs/{run_id}")
                with anyio.fail_after(10):
                    events = await reader.get(f"/tasks/runs/{run_id}/events")
                listing = await reader.get("/tasks/runs")
                history = await reader.get(f"/tasks/runs/{run_id}/history")
            figures.bad_inputs_tried += 2
            doc = response.json()
            assert response.status_code == 200, (name, response.text)
            assert set(doc) == DOCUMENT_KEYS, (name, sorted(doc))
            assert doc["args"] is None and doc["kwargs"] is None, name
            assert doc["error"] == {"type": "ValueError", "message": "boom", "traceback": None}
            assert events.status_code == 200, (name, events.text)
            for leak in ("secret-arg", "secret-traceback"):
                if leak in response.text or leak in events.text:
                    figures.wrong(f"{name} read {leak}")
                else:
                    figures.rejected_cleanly += 1
            for refused in (listing, history):
                figures.saw(f"{name} on an operator route", refused)
                assert refused.status_code == 401, (name, refused.text)
    figures.assert_clean()


SERVER_OWNED = [
    {"id": str(uuid.uuid4())},
    {"lease_token": "mine"},
    {"lease_expires_at": "2099-01-01T00:00:00Z"},
    {"created_at": "2000-01-01T00:00:00Z"},
    {"scheduled_at": "2000-01-01T00:00:00Z"},
    {"finished_at": "2000-01-01T00:00:00Z"},
    {"max_attempts": 1000},
    {"retries": 1000},
    {"max_rescues": 1000},
    {"timeout_seconds": 0},
    {"error": {"type": "X", "message": "y"}},
    {"rescues": 0},
    {"queue": "admin"},
    {"__proto__": {"state": "COMPLETED"}},
]


async def test_server_owned_fields_are_refused_with_422_on_every_body(
    db_url: str, tally: Any
) -> None:
    """Mass assignment: submit (beyond tests/server/test_intake.py's state/attempt/
    worker_id/result), reports and heartbeats refuse fields they do not own."""
    figures = tally("bola")
    async with api(db_url) as (hub, http):
        for extra in SERVER_OWNED:
            response = await http.post("/tasks/runs", json={"task": "echo", "args": [1], **extra})
            figures.saw(f"submit with {sorted(extra)}", response)
            assert response.status_code == 422, (extra, response.text)
        assert await run_count(hub) == 0
        run_id = await submit(http, "echo", 1)
        lease_token = await claim(hub, run_id)
        before = await stored(hub, run_id)
        report_extras = [
            {"attempt": 99},
            {"worker_id": "other"},
            {"lease_expires_at": "2099-01-01T00:00:00Z"},
            {"max_attempts": 99},
        ]
        for extra in report_extras:
            body = report_body(run_id, lease_token, "COMPLETED", result=1, **extra)
            response = await http.post("/tasks/worker/reports", json=body)
            figures.saw(f"report with {sorted(extra)}", response)
            assert response.status_code == 422, (extra, response.text)
        for extra in ({"lease_seconds": 10**9}, {"lease_expires_at": "2099-01-01T00:00:00Z"}):
            held = [{"run_id": run_id, "lease_token": lease_token, **extra}]
            for body in (
                {"worker_id": "w1", "runs": held},
                {"worker_id": "w1", "runs": [], **extra},
            ):
                response = await http.post("/tasks/worker/heartbeat", json=body)
                figures.saw(f"heartbeat with {sorted(extra)}", response)
                assert response.status_code == 422, (body, response.text)
        if await stored(hub, run_id) != before:
            figures.wrong("a refused report or heartbeat changed the run")
    figures.assert_clean()


# -- S3: limits ------------------------------------------------------------------


def args_size(args: list[Any]) -> int:
    return len(json.dumps([args, {}], separators=(",", ":")))


async def test_arguments_at_the_limit_are_stored_and_one_byte_over_is_413(
    db_url: str, tally: Any
) -> None:
    figures = tally("size")
    limit = 1000
    at_limit = "x" * (limit - args_size([""]))
    assert args_size([at_limit]) == limit
    async with api(db_url, max_args_bytes=limit) as (hub, http):
        accepted = await http.post("/tasks/runs", json={"task": "echo", "args": [at_limit]})
        assert accepted.status_code == 202, accepted.text
        assert (await stored(hub, accepted.json()["id"]))["args"] == [at_limit]
        for over in ([at_limit + "x"], [at_limit + "é"]):
            response = figures.saw(
                "args over the limit",
                await http.post("/tasks/runs", json={"task": "echo", "args": over}),
            )
            assert response.status_code == 413, response.text
            assert response.json()["error"] == "payload_too_large"
        by_keyword = await http.post(
            "/tasks/runs", json={"task": "echo", "kwargs": {"value": at_limit + "x"}}
        )
        figures.saw("kwargs over the limit", by_keyword)
        assert by_keyword.status_code == 413, by_keyword.text
        assert await run_count(hub) == 1
    figures.assert_clean()


async def test_malformed_and_oversized_bodies_are_4xx_never_500(db_url: str, tally: Any) -> None:
    figures = tally("size")
    deep = 100_000
    async with api(db_url, max_body_bytes=4 * MiB, max_args_bytes=4 * MiB) as (hub, http):
        run_id = await submit(http, "echo", 1)
        lease_token = await claim(hub, run_id)
        before = await stored(hub, run_id)
        lease = f'{{"run_id":"{run_id}","lease_token":"{lease_token}"'.encode()
        bad_bodies: dict[str, tuple[str, bytes, str]] = {
            "report nested 100k deep": (
                "/tasks/worker/reports",
                b'{"worker_id":"w1","reports":[' + lease[:-1] + b',"state":"COMPLETED",'
                b'"result":' + b"[" * deep + b"]" * deep + b"}]}",
                "application/json",
            ),
            "heartbeat nested 100k deep": (
                "/tasks/worker/heartbeat",
                b'{"worker_id":"w1","runs":' + b"[" * deep + b"]" * deep + b"}",
                "application/json",
            ),
            "1M reports": (
                "/tasks/worker/reports",
                b'{"worker_id":"w1","reports":[' + b",".join([b"{}"] * 1_000_000) + b"]}",
                "application/json",
            ),
            "1M held leases": (
                "/tasks/worker/heartbeat",
                b'{"worker_id":"w1","runs":[' + b",".join([b"0"] * 1_000_000) + b"]}",
                "application/json",
            ),
            "Infinity in args": (
                "/tasks/runs",
                b'{"task":"echo","args":[Infinity]}',
                "application/json",
            ),
            "-Infinity in kwargs": (
                "/tasks/runs",
                b'{"task":"echo","kwargs":{"value":-Infinity}}',
                "application/json",
            ),
            "a 5000-digit integer": (
                "/tasks/runs",
                b'{"task":"echo","args":[' + b"9" * 5000 + b"]}",
                "application/json",
            ),
            "invalid UTF-8 in a submit": (
                "/tasks/runs",
                b'{"task":"echo","args":["\xff\xfe\xc3"]}',
                "application/json",
            ),
            "invalid UTF-8 in a report": (
                "/tasks/worker/reports",
                b'{"worker_id":"w\xff","reports":[]}',
                "application/json",
            ),
            "a report as text/plain": (
                "/tasks/worker/reports",
                json.dumps(report_body(run_id, lease_token, result=1)).encode(),
                "text/plain",
            ),
            "a submit as a form": (
                "/tasks/runs",
                b"task=echo&args=1",
                "application/x-www-form-urlencoded",
            ),
            "a submit as multipart": (
                "/tasks/runs",
                b'--b\r\nContent-Disposition: form-data; name="task"\r\n\r\necho\r\n--b--\r\n',
                "multipart/form-data; boundary=b",
            ),
            "an empty JSON body": ("/tasks/worker/heartbeat", b"", "application/json"),
        }
        for name, (path, content, content_type) in bad_bodies.items():
            response = await http.post(
                path, content=content, headers={"Content-Type": content_type}
            )
            figures.saw(name, response)
            assert 400 <= response.status_code < 500, (
                name,
                response.status_code,
                response.text[:300],
            )
        # A million elements within the byte limit: stored as sent, or refused; never a 500.
        million = b'{"task":"echo","args":[[' + b",".join([b"0"] * 1_000_000) + b"]]}"
        response = figures.saw(
            "1M-element array", await http.post("/tasks/runs", content=million, headers=JSON)
        )
        assert response.status_code in (202, 413, 422), response.text[:300]
        if response.status_code == 202:
            figures.extra["million_element_array"] = "stored"
            assert (await stored(hub, response.json()["id"]))["args"] == [[0] * 1_000_000]
        for limit in (10**9, 0, -1, "1e3", "NaN", "", str(10**30)):
            response = figures.saw(
                f"limit={limit}", await http.get("/tasks/runs", params={"limit": limit})
            )
            assert response.status_code == 422, (limit, response.text)
        if await stored(hub, run_id) != before:
            figures.wrong("a refused report changed the run")
        expected = 2 if figures.extra.get("million_element_array") else 1
        assert await run_count(hub) == expected
    figures.assert_clean()


NON_FINITE = {
    "NaN countdown": ("/tasks/runs", b'{"task":"echo","args":[1],"countdown":NaN}'),
    "infinite priority": ("/tasks/runs", b'{"task":"echo","args":[1],"priority":1e400}'),
    "NaN task name": ("/tasks/runs", b'{"task":NaN}'),
    "NaN for an int argument": ("/tasks/runs", b'{"task":"add","args":[NaN,1]}'),
    "NaN run id in a heartbeat": (
        "/tasks/worker/heartbeat",
        b'{"worker_id":"w1","runs":[{"run_id":NaN,"lease_token":"x"}]}',
    ),
}


async def test_a_non_finite_number_in_a_field_that_refuses_it_is_a_422(
    db_url: str, tally: Any
) -> None:
    figures = tally("size")
    async with api(db_url) as (hub, http):
        statuses = {}
        for name, (path, content) in NON_FINITE.items():
            response = figures.saw(name, await http.post(path, content=content, headers=JSON))
            statuses[name] = response.status_code
        assert await run_count(hub) == 0
    assert statuses == dict.fromkeys(NON_FINITE, 422)
    figures.assert_clean()


async def test_an_oversized_result_ends_the_run_failed_result_too_large(
    db_url: str, tally: Any
) -> None:
    figures = tally("size")
    async with api(db_url, max_result_bytes=1000) as (hub, http):
        run_id = await submit(http, "echo", 1)
        lease_token = await claim(hub, run_id)
        body = report_body(run_id, lease_token, "COMPLETED", result="x" * 2000)
        response = figures.saw(
            "oversized result", await http.post("/tasks/worker/reports", json=body)
        )
        assert response.json() == {"outcomes": ["accepted"]}, response.text
        doc = (await http.get(f"/tasks/runs/{run_id}")).json()
        assert doc["state"] == "FAILED" and doc["result"] is None, doc
        assert doc["error"]["type"] == "ResultTooLarge", doc
        # An error report is bounded only by the worker body limit: it must
        # still settle the run, never a 500.
        other = await submit(http, "echo", 2)
        lease_token = await claim(hub, other)
        # Under the worker body limit, over max_result_bytes a hundred times.
        error = {"type": "E" * 10_000, "message": "m" * 100_000, "traceback": "t" * 500_000}
        body = report_body(other, lease_token, "FAILED", error=error)
        response = figures.saw(
            "huge error report", await http.post("/tasks/worker/reports", json=body)
        )
        assert response.status_code in (200, 413, 422), response.text[:300]
        doc = (await http.get(f"/tasks/runs/{other}")).json()
        figures.extra["huge_error_report_status"] = response.status_code
        if response.status_code == 200:
            assert doc["state"] == "FAILED", doc["state"]
            figures.extra["huge_error_report_stored_bytes"] = len(json.dumps(doc["error"]))
    figures.assert_clean()


# -- S4: payloads and reports are data, never code --------------------------------


class Canary:
    """Unpickling this creates the file at `path`: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


PICKLE_BODIES = [
    ("/tasks/runs", "application/x-python-serialize"),
    ("/tasks/runs", "application/python-pickle"),
    ("/tasks/runs", "application/json"),
    ("/tasks/worker/reports", "application/x-python-serialize"),
    ("/tasks/worker/heartbeat", "application/octet-stream"),
]


async def test_a_pickle_body_is_refused_with_a_4xx_and_never_runs(
    db_url: str, tmp_path: Path, tally: Any
) -> None:
    figures = tally("serialization")
    canary = tmp_path / "pickle-canary"
    payload = pickle.dumps(Canary(str(canary)))
    async with api(db_url) as (hub, http):
        statuses = {}
        for path, content_type in PICKLE_BODIES:
            response = await http.post(
                path, content=payload, headers={"Content-Type": content_type}
            )
            figures.saw(f"pickle body as {content_type} to {path}", response)
            statuses[(path, content_type)] = response.status_code
        if await run_count(hub) != 0:
            figures.wrong("a pickle body stored a run")
    if canary.exists():
        figures.wrong("the pickle canary was created")
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    figures.assert_clean()


async def test_pickles_inside_json_are_stored_as_inert_strings(
    db_url: str, tmp_path: Path, tally: Any
) -> None:
    figures = tally("serialization")
    canary = tmp_path / "pickle-canary"
    payload = pickle.dumps(Canary(str(canary)))
    encoded = base64.b64encode(payload).decode()
    jsonpickle = {"py/reduce": [{"py/function": "builtins.open"}, [str(canary), "w"]]}
    async with api(db_url) as (hub, http):
        inert = [encoded, {"__reduce__": encoded, **jsonpickle}, [encoded, payload.hex()]]
        for value in inert:
            run_id = await submit(http, "echo", value)
            figures.bad_inputs_tried += 1
            figures.accepted_as_valid += 1
            lease_token = await claim(hub, run_id)
            body = report_body(run_id, lease_token, "COMPLETED", result=value)
            reported = await http.post("/tasks/worker/reports", json=body)
            assert reported.json() == {"outcomes": ["accepted"]}, reported.text
            doc = (await http.get(f"/tasks/runs/{run_id}")).json()
            if doc["args"] != [value] or doc["result"] != value:
                figures.wrong(f"stored pickle changed: {doc['args']!r} {doc['result']!r}")
    if canary.exists():
        figures.wrong("the pickle canary was created")
    figures.assert_clean()


async def test_a_celery_shaped_failure_report_is_refused_or_stored_as_text(
    db_url: str, tmp_path: Path, tally: Any
) -> None:
    """CVE-2021-23727: Celery rebuilt an exception from `exc_module` and
    `exc_type` in a result. Here a report's error is plain text."""
    figures = tally("serialization")
    canary = tmp_path / "celery-canary"
    celery = {"exc_module": "os", "exc_type": "system", "exc_message": [f"touch {canary}"]}
    async with api(db_url) as (hub, http):
        run_id = await submit(http, "echo", 1)
        lease_token = await claim(hub, run_id)
        before = await stored(hub, run_id)
        refused = [
            report_body(run_id, lease_token, "FAILED", **celery),
            report_body(run_id, lease_token, "FAILED", result=None, traceback=None, **celery),
            report_body(run_id, lease_token, "FAILED", error={"type": {"__class__": "os.system"}}),
            report_body(run_id, lease_token, "FAILED", error=[celery]),
        ]
        for body in refused:
            response = figures.saw(
                "celery-shaped report", await http.post("/tasks/worker/reports", json=body)
            )
            assert response.status_code == 422, response.text
        if await stored(hub, run_id) != before:
            figures.wrong("a refused report changed the run")
        error = {"type": "system", "message": f"touch {canary}", **celery}
        body = report_body(run_id, lease_token, "FAILED", error=error, result=celery)
        response = figures.saw(
            "celery fields inside error", await http.post("/tasks/worker/reports", json=body)
        )
        assert response.status_code in (200, 422), response.text
        doc = (await http.get(f"/tasks/runs/{run_id}")).json()
        if response.status_code == 200:
            assert doc["state"] == "FAILED"
            assert doc["error"] == {
                "type": "system",
                "message": f"touch {canary}",
                "traceback": None,
            }
    if canary.exists():
        figures.wrong("the celery canary was created")
    figures.assert_clean()


CODE_NAMES = [
    "os.system",
    "tests.tasks:__import__",
    "tests.faults.test_security:echo",
    "fastapi_bgtasks.hub:BgTasks",
    "builtins.eval",
    "__import__",
    "eval",
    "echo.__globals__",
    "echo.__call__",
    "subprocess:Popen",
    "../echo",
    "ECHO",
    " echo",
    "echo ",
    "\u0435cho",  # a Cyrillic ie
    "echo\x00",
]


async def test_task_names_shaped_like_code_are_unknown_tasks(db_url: str, tally: Any) -> None:
    figures = tally("serialization")
    async with api(db_url) as (hub, http):
        for name in CODE_NAMES:
            response = await http.post("/tasks/runs", json={"task": name, "args": [1]})
            figures.saw(f"task name {name!r}", response)
            assert response.status_code in (404, 422), (name, response.text)
            if response.status_code == 404:
                assert response.json()["error"] == "task_not_found"
            listed = await http.get("/tasks/runs", params={"task": name})
            assert listed.status_code in (200, 422), (name, listed.text)
        if await run_count(hub) != 0:
            figures.wrong("a run was stored under a code-shaped task name")
    figures.assert_clean()


# -- S6: fuzzing and injection --------------------------------------------------

INJECTION = [
    "' OR 1=1--",
    "'; DROP TABLE runs;--",
    '" OR ""="',
    "%",
    "%_",
    "_",
    "\\",
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "\r\n",
    "a\r\nX-Injected: 1",
    '\n\ndata: {"run_id":"00000000-0000-4000-8000-000000000000"}\n\n',
    "\r\nevent: run",
    "\nevent: runs\ndata: []\n\n",
    "a\x00b",
    "${jndi:ldap://127.0.0.1/x}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    '{"$gt": ""}',
    "\U0001f600",
    "\u2028\u2029\u0085",
    "\ufeff",
    "x" * 10_000,
]


async def test_an_injection_corpus_is_refused_cleanly_or_round_trips_exactly(
    db_url: str, tally: Any, caplog: pytest.LogCaptureFixture
) -> None:
    figures = tally("injection")
    caplog.set_level("DEBUG", logger="fastapi_bgtasks")
    async with api(db_url) as (hub, http), client(hub.app) as mounted:
        control = await submit(http, "echo", "control")
        for value in INJECTION:
            short = repr(value[:30])
            # As a task name: never a task, never a 5xx.
            response = await http.post("/tasks/runs", json={"task": value, "args": [1]})
            figures.saw(f"task name {short}", response)
            assert response.status_code in (404, 422), (short, response.text[:300])
            # As arguments, also as a key: stored and read back exactly.
            for args in ([value], [{value: value}]):
                response = await http.post("/tasks/runs", json={"task": "echo", "args": args})
                figures.saw(f"args {short}", response)
                if response.status_code == 202:
                    doc = (await http.get(f"/tasks/runs/{response.json()['id']}")).json()
                    if doc["args"] != args:
                        figures.wrong(f"args {short} read back as {doc['args']!r:.80}")
            # As an idempotency key: a repeat replays the same run.
            body = {"task": "echo", "args": ["k"], "idempotency_key": value}
            first = figures.saw(
                f"idempotency key {short}", await http.post("/tasks/runs", json=body)
            )
            if first.status_code == 202:
                again = await http.post("/tasks/runs", json=body)
                if again.json().get("id") != first.json()["id"]:
                    figures.wrong(f"idempotency key {short} did not replay")
            try:
                header = await http.post(
                    "/tasks/runs",
                    json={"task": "echo", "args": ["h"]},
                    headers={"Idempotency-Key": value},
                )
            except (httpx.LocalProtocolError, UnicodeEncodeError):
                pass  # the client cannot send it as a header at all
            else:
                figures.saw(f"Idempotency-Key header {short}", header)
            # As filters and ids.
            listed = await http.get("/tasks/runs", params={"task": value})
            figures.saw(f"task filter {short}", listed)
            if listed.status_code == 200 and listed.json()["runs"]:
                figures.wrong(f"task filter {short} matched {len(listed.json()['runs'])} runs")
            for params in ({"state": value}, {"cursor": value}):
                figures.saw(f"filter {params}", await http.get("/tasks/runs", params=params))
            # Straight to the mounted app: a host's Mount does not match a
            # path holding a newline, so it would answer for the library.
            path = quote(value, safe="")
            figures.saw(f"run id {short}", await mounted.get(f"/runs/{path}"))
            # As a worker id.
            beat = {"worker_id": value, "runs": []}
            figures.saw(f"worker id {short}", await http.post("/tasks/worker/heartbeat", json=beat))
        control_doc = (await http.get(f"/tasks/runs/{control}")).json()
        assert control_doc["args"] == ["control"] and control_doc["state"] == "SCHEDULED"
    raw = [v for v in INJECTION if "\r" in v or "\n" in v]
    for record in caplog.records:
        message = record.getMessage()
        if any(v in message for v in raw):
            figures.wrong(f"a log line carries raw CR/LF from input: {message[:100]!r}")
    figures.assert_clean()


async def test_a_lone_surrogate_in_arguments_is_refused_or_round_trips(
    db_url: str, tally: Any
) -> None:
    figures = tally("injection")
    async with api(db_url) as (_, http):
        response = await http.post(
            "/tasks/runs", content=b'{"task":"echo","args":["a\\ud800b"]}', headers=JSON
        )
        figures.saw("a lone surrogate in args", response)
        listing = await http.get("/tasks/runs")
        if listing.status_code >= 500:
            figures.wrong("a stored lone surrogate makes GET /runs a 500")
    figures.assert_clean()
    assert listing.status_code == 200


async def test_a_lone_surrogate_in_a_reported_result_does_not_break_reads(
    db_url: str, tally: Any
) -> None:
    figures = tally("injection")
    async with api(db_url) as (hub, http):
        run_id = await submit(http, "echo", 1)
        lease_token = await claim(hub, run_id)
        body = json.dumps(report_body(run_id, lease_token, result="a\ud800b")).encode()
        response = figures.saw(
            "a lone surrogate in a result",
            await http.post("/tasks/worker/reports", content=body, headers=JSON),
        )
        read = await http.get(f"/tasks/runs/{run_id}")
        if response.status_code == 200 and read.status_code >= 500:
            figures.wrong("a stored lone surrogate makes GET /runs/{id} a 500")
    figures.assert_clean()
    assert read.status_code == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_schemathesis_finds_no_server_error_or_schema_violation(db_url: str, tally: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.python import asgi as schemathesis_asgi
    from schemathesis.specs.openapi.checks import response_schema_conformance
    from starlette.applications import Starlette
    from starlette.routing import Mount

    figures = tally("fuzz")
    hub = make_hub(db_url, token=TOKEN)
    # The mounted app (body limit included) with the hub's lifespan, which
    # schemathesis runs on its own event loop thread for the whole test.
    app = Starlette(lifespan=hub.lifespan, routes=[Mount("/", app=hub.app)])
    cases: dict[str, int] = {}
    failures: list[str] = []

    def steer(pair: tuple[Any, bool]) -> Any:
        """Half of the positive submits name a real task, to reach the store."""
        case, to_echo = pair
        if to_echo and isinstance(case.body, dict):
            args = case.body.get("args")
            case.body.update(
                task="echo", kwargs={}, args=args[:1] if isinstance(args, list) else []
            )
        return case

    def make_fuzz(strategy: Any, key: str, mode: Any) -> Any:
        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            cases[key] = cases.get(key, 0) + 1
            response = case.call(headers=BEARER)
            if mode == GenerationMode.NEGATIVE:
                figures.bad_inputs_tried += 1
                if 400 <= response.status_code < 500:
                    figures.rejected_cleanly += 1
                elif response.status_code < 400:
                    figures.accepted_as_valid += 1
            if response.status_code >= 500:
                figures.server_errors += 1
            try:
                case.validate_response(
                    response, checks=[not_a_server_error, response_schema_conformance]
                )
            except Exception as exc:
                failures.append(f"{key}: {response.status_code} {str(exc)[:300]}")

        return fuzz

    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        streams = {"/feed", "/runs/{run_id}/events"}
        for operation in operations:
            if operation.path in streams:
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)
                if operation.label == "POST /runs" and mode == GenerationMode.POSITIVE:
                    strategy = st.tuples(strategy, st.booleans()).map(steer)
                key = f"{operation.label} {mode.value}"

                fuzz = make_fuzz(strategy, key, mode)
                try:
                    fuzz()
                except Unsatisfiable:
                    pass  # nothing to make invalid (GET /health takes no input)
    finally:
        schemathesis_asgi.shutdown_lifespans()
    figures.extra["schemathesis_cases"] = sum(cases.values())
    figures.extra["schemathesis_failures"] = len(failures)
    figures.extra["cases_per_operation"] = cases
    tested = {key.rsplit(" ", 1)[0] for key in cases}
    assert len(tested) == len(operations) - 2, sorted(tested)
    assert failures == []
    assert figures.server_errors == 0


# -- over a real uvicorn: tests/faults/secapp.py -----------------------------------


@dataclass
class SecServer:
    proc: Proc
    base: str
    db_url: str

    @property
    def api(self) -> str:
        return f"{self.base}/tasks"

    def client(self, source: str = "127.0.0.1", **kwargs: Any) -> httpx.Client:
        """A client whose connections come from `source`, a loopback address
        of its own, so refused credentials are counted against it alone."""
        kwargs.setdefault("timeout", httpx.Timeout(10.0))
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(transport=transport, base_url=self.api, **kwargs)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(f"{self.base}/__test__/state", timeout=10).json()
        return state

    def wait_state(self, key: str, value: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state()[key] != value:
            assert time.monotonic() < deadline, f"{key} stayed {self.state()[key]}, not {value}"
            time.sleep(0.02)

    def submit(self, task: str, *args: Any) -> str:
        response = httpx.post(
            f"{self.api}/runs", json={"task": task, "args": list(args)}, headers=BEARER
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def run(self, run_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(
            f"{self.api}/runs/{run_id}", headers=BEARER, timeout=10
        ).json()
        return doc


@pytest.fixture(scope="module")
def sec_server(shared_db: tuple[str, Path]) -> Iterator[SecServer]:
    url, directory = shared_db
    proc, base = start_app(
        url,
        directory,
        module="tests.faults.secapp:app",
        name="secapp",
        BGTASKS_TOKEN=TOKEN,
        BGTASKS_SEC_MAX_FEEDS="3",
        BGTASKS_SEC_MAX_STREAMS="10",
        BGTASKS_SEC_POOL_SIZE="2",
    )
    try:
        yield SecServer(proc, base, url)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def open_server(shared_db: tuple[str, Path]) -> Iterator[SecServer]:
    """The same app with no token and no `auth=`: loopback trust serves it."""
    url, directory = shared_db
    proc, base = start_app(url, directory, module="tests.faults.secapp:app", name="secapp-open")
    try:
        yield SecServer(proc, base, url)
    finally:
        proc.stop()


class SseReader:
    """Reads an event stream the way the SSE spec does: a line ends in CRLF,
    LF or CR, a blank line ends an event. Any field but `event` and `data`
    (sse-starlette sends no other) is recorded as unexpected.

    No generator here refers back to the reader, so dropping a reader closes
    its response at once, never later from the garbage collector.
    """

    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.iter_raw()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = ""
        self._lines: deque[str] = deque()
        self._event = ""
        self._data: list[str] = []
        self.unexpected: list[str] = []

    def _line(self) -> str | None:
        while not self._lines:
            chunk = next(self._chunks, None)
            if chunk is None:
                return None
            text = self._pending + self._decoder.decode(chunk)
            hold = text.endswith("\r")  # maybe the first half of a CRLF
            if hold:
                text = text[:-1]
            *lines, rest = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            self._pending = rest + ("\r" if hold else "")
            self._lines.extend(lines)
        return self._lines.popleft()

    def next(self) -> tuple[str, str] | None:
        """The next (event, data), or None when the stream ends."""
        while (line := self._line()) is not None:
            if line == "":
                if self._data or self._event:
                    event = (self._event or "message", "\n".join(self._data))
                    self._event, self._data = "", []
                    return event
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                elif name == "event":
                    self._event = value
                else:
                    self.unexpected.append(line)
        return None


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any
    seconds: float


def refusal(http: httpx.Client, method: str, url: str, **kwargs: Any) -> Answer:
    """Send a request that should be refused, without ever reading an event
    stream it might open instead."""
    started = time.monotonic()
    with http.stream(method, url, **kwargs) as response:
        content_type = response.headers.get("content-type", "")
        body: Any = None
        if not content_type.startswith("text/event-stream"):
            response.read()
            try:
                body = response.json()
            except ValueError:
                body = response.text[:200]
    return Answer(response.status_code, content_type, body, time.monotonic() - started)


def count_answer(figures: Tally, what: str, answer: Answer) -> None:
    figures.bad_inputs_tried += 1
    clean = (
        400 <= answer.status < 500
        and answer.content_type.startswith("application/json")
        and isinstance(answer.body, dict)
        and set(answer.body) == ERROR_KEYS
    )
    if answer.status >= 500:
        figures.server_errors += 1
        figures.problems.append(f"{what}: {answer.status}")
    elif clean:
        figures.rejected_cleanly += 1
    elif answer.status >= 400:
        figures.unclean_rejections += 1
        figures.problems.append(f"{what}: {answer.status} {answer.content_type}")
    else:
        figures.wrong(f"{what}: {answer.status} {answer.content_type}")


FEED = {"params": {"task": "add", "slots": 1}, "headers": {"X-Worker-Id": "intruder"}}


def test_the_feed_refuses_a_bad_credential_before_any_event_stream(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("auth")
    run_id = sec_server.submit("add", 1, 2)
    basic = base64.b64encode(f"worker:{TOKEN}".encode()).decode()
    bad = {
        "no header": {},
        "scheme without a token": {"Authorization": "Bearer"},
        "wrong token": {"Authorization": "Bearer wrong"},
        "basic scheme": {"Authorization": f"Basic {basic}"},
        "token without scheme": {"Authorization": TOKEN},
        "operator header": ADMIN,
    }
    with sec_server.client("127.0.0.2") as http:
        answers = {}
        for name, headers in bad.items():
            answers[name] = refusal(
                http, "GET", "/feed", params=FEED["params"], headers={**FEED["headers"], **headers}
            )
        answers["token in the query"] = refusal(
            http,
            "GET",
            "/feed",
            params={**FEED["params"], "token": TOKEN, "access_token": TOKEN},
            headers=FEED["headers"],
        )
    for name, answer in answers.items():
        count_answer(figures, f"feed with {name}", answer)
        assert answer.status == 401, (name, answer)
        assert answer.content_type.startswith("application/json"), (name, answer)
        assert answer.body["error"] == "unauthorized", (name, answer)
    figures.extra["max_refusal_ms"] = round(1000 * max(a.seconds for a in answers.values()), 1)
    assert sec_server.state()["open_feeds"] == 0
    if sec_server.run(run_id)["state"] != "SCHEDULED":
        figures.wrong("a refused feed claimed a run")
    figures.assert_clean()


def test_repeated_refused_credentials_get_429_for_that_client_only(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("auth")
    heartbeat = {"worker_id": "w", "runs": []}

    def wrong(n: int) -> dict[str, str]:
        return {"Authorization": f"Bearer wrong-{n}"}

    with sec_server.client("127.0.0.3") as http:
        statuses = []
        for n in range(30):
            response = figures.saw(
                "wrong token", http.post("/worker/heartbeat", json=heartbeat, headers=wrong(n))
            )
            statuses.append(response.status_code)
        assert statuses == [401] * 30
        limited = {
            "heartbeat": refusal(
                http, "POST", "/worker/heartbeat", json=heartbeat, headers=wrong(30)
            ),
            "reports": refusal(
                http,
                "POST",
                "/worker/reports",
                json={"worker_id": "w", "reports": []},
                headers=wrong(31),
            ),
            "feed": refusal(http, "GET", "/feed", **FEED),
            "submit with a wrong bearer": refusal(
                http, "POST", "/runs", json={"task": "add", "args": [1, 2]}, headers=wrong(32)
            ),
        }
        # The credential is checked first: the right token is never refused,
        # so workers sharing the address are not locked out with it.
        right = http.post("/worker/heartbeat", json=heartbeat, headers=BEARER)
        submit = http.post("/runs", json={"task": "add", "args": [1, 2]}, headers=BEARER)
    for name, answer in limited.items():
        count_answer(figures, f"{name} while limited", answer)
        assert answer.status == 429, (name, answer)
        assert answer.body["error"] == "too_many_requests", (name, answer)
    assert right.status_code == 200, right.text
    assert submit.status_code == 202, submit.text
    # Another client is not limited by this one's failures.
    with sec_server.client("127.0.0.1") as http:
        assert http.post("/worker/heartbeat", json=heartbeat, headers=wrong(0)).status_code == 401
    figures.assert_clean()


def test_a_clients_own_bearer_on_status_reads_never_locks_out_its_addresss_workers(
    sec_server: SecServer, tally: Any
) -> None:
    """A single-page app sends its session bearer on every call; behind a
    proxy it shares the workers' address. Its status reads count nothing."""
    figures = tally("auth")
    run_id = sec_server.submit("add", 1, 2)
    session = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJl"}
    heartbeat = {"worker_id": "w", "runs": []}
    with sec_server.client("127.0.0.6") as http:
        reads = [http.get(f"/runs/{run_id}", headers=session) for _ in range(40)]
        beats = [http.post("/worker/heartbeat", json=heartbeat, headers=BEARER) for _ in range(3)]
        anonymous = refusal(http, "POST", "/worker/heartbeat", json=heartbeat)
        with http.stream(
            "GET",
            "/feed",
            params={"task": "no-such-task", "slots": 1},
            headers={**BEARER, "X-Worker-Id": "neighbour"},
        ) as feed:
            feed_status = feed.status_code
    assert {r.status_code for r in reads} == {200}
    assert all(r.json()["args"] is None for r in reads)
    assert [b.status_code for b in beats] == [200] * 3
    count_answer(figures, "anonymous heartbeat beside a session bearer", anonymous)
    assert anonymous.status == 401, anonymous
    assert feed_status == 200
    sec_server.wait_state("open_feeds", 0)
    figures.assert_clean()


def test_fifty_unauthenticated_feed_opens_are_refused_before_streaming(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("sse")
    with sec_server.client("127.0.0.4") as http:
        answers = [refusal(http, "GET", "/feed", **FEED) for _ in range(50)]
    for answer in answers:
        count_answer(figures, "unauthenticated feed", answer)
    statuses = [a.status for a in answers]
    # One refused credential (none) repeated counts once: never a 429 here.
    assert statuses == [401] * 50, statuses
    seconds = sorted(a.seconds for a in answers)
    figures.extra["refusal_ms_p50"] = round(1000 * seconds[25], 1)
    figures.extra["refusal_ms_max"] = round(1000 * seconds[-1], 1)
    assert sec_server.state()["open_feeds"] == 0
    figures.assert_clean()


def test_feeds_over_the_cap_get_429(sec_server: SecServer, tally: Any) -> None:
    figures = tally("sse")
    assert sec_server.state()["max_feeds"] == 3

    def feed(http: httpx.Client, worker_id: str) -> Any:
        return http.stream(
            "GET",
            "/feed",
            params={"task": "never", "slots": 1},
            headers={**BEARER, "X-Worker-Id": worker_id},
        )

    # Readers are kept: dropping one closes its response, and so its feed.
    readers: list[SseReader] = []
    with sec_server.client() as http, ExitStack() as stack:
        for worker_id in ("cap-a", "cap-a", "cap-b"):
            response = stack.enter_context(feed(http, worker_id))
            assert response.status_code == 200
            readers.append(SseReader(response))
            assert readers[-1].next() is not None  # hello
        over = {
            "a third feed for one worker id": refusal(
                http,
                "GET",
                "/feed",
                params={"task": "never", "slots": 1},
                headers={**BEARER, "X-Worker-Id": "cap-a"},
            ),
            "a fourth feed": refusal(
                http,
                "GET",
                "/feed",
                params={"task": "never", "slots": 1},
                headers={**BEARER, "X-Worker-Id": "cap-c"},
            ),
        }
        for name, answer in over.items():
            count_answer(figures, name, answer)
            assert answer.status == 429, (name, answer)
            assert answer.body["error"] == "too_many_requests"
        assert sec_server.state()["open_feeds"] == 3
    sec_server.wait_state("open_feeds", 0)
    with sec_server.client() as http, feed(http, "cap-d") as response:
        assert response.status_code == 200
    figures.extra["sse_streams"] = {"feeds_accepted": 4, "feeds_refused": 2, "feed_cap": 3}
    figures.assert_clean()


def pg_backends(db_url: str) -> int | None:
    """Connections the app holds to its database, per pg_stat_activity."""
    if not db_url.startswith("postgresql"):
        return None
    name = db_url.rsplit("/", 1)[1]

    async def count() -> int:
        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'fastapi_bgtasks' AND datname = $1",
                    name,
                )
            )
        finally:
            await conn.close()

    return anyio.run(count)


def test_event_streams_over_the_cap_get_429_and_pin_no_connection(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("sse")
    state = sec_server.state()
    cap, pool_size = state["max_streams"], state["pool_size"]
    run_id = sec_server.submit("add", 2, 3)  # nothing serves `add`: it stays SCHEDULED
    with sec_server.client() as http:
        for _ in range(5):
            assert http.get(f"/runs/{run_id}").status_code == 200
    baseline = {
        "checked_out": sec_server.state()["checked_out"],
        "pg": pg_backends(sec_server.db_url),
    }
    during: dict[str, list[Any]] = {"checked_out": [], "pg": [], "direct": []}
    latencies = []
    readers: list[SseReader] = []
    with sec_server.client() as http, ExitStack() as stack:
        for _ in range(cap):
            response = stack.enter_context(http.stream("GET", f"/runs/{run_id}/events"))
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            readers.append(SseReader(response))  # kept: a dropped one closes its stream
            event = readers[-1].next()
            assert event is not None and event[0] == "state", event
        over = refusal(http, "GET", f"/runs/{run_id}/events")
        count_answer(figures, "an event stream over the cap", over)
        assert over.status == 429, over
        assert sec_server.state()["open_streams"] == cap
        for _ in range(20):
            started = time.monotonic()
            response = http.get(f"/runs/{run_id}")
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
            state = sec_server.state()
            during["checked_out"].append(state["checked_out"])
            during["direct"].append(state["direct_connections"])
            during["pg"].append(pg_backends(sec_server.db_url))
    sec_server.wait_state("open_streams", 0)
    latencies.sort()
    figures.extra["sse_streams"] = {
        "attempted": cap + 1,
        "accepted": cap,
        "refused": 1,
        "peak_concurrent": cap,
        "baseline": baseline,
        "peak_checked_out": max(during["checked_out"], key=lambda v: v or 0),
        "peak_pg_backends": max(during["pg"], key=lambda v: v or 0),
        "get_run_ms_p95": round(1000 * latencies[int(0.95 * len(latencies)) - 1], 1),
    }
    if baseline["checked_out"] is not None:
        # Sampled between requests: a stream holding a connection shows here.
        assert max(during["checked_out"]) <= baseline["checked_out"] + 1, during
    if baseline["pg"] is not None:
        # The pool's own connections, the LISTEN one and the submit fast
        # path's (one here: the submit above): none per stream.
        direct = max(during["direct"])
        assert direct <= 1, during["direct"]
        assert max(during["pg"]) <= pool_size + 1 + direct, (baseline, during["pg"])
    figures.assert_clean()


def post_streamed(
    base: str, path: str, total: int, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes, int]:
    """POST `total` bytes chunked (no Content-Length) from a raw socket, and
    stop sending as soon as the server answers. (status, headers, body, sent)."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    sock = socket.create_connection((host, port), timeout=10)
    try:
        head = f"POST {parts.path}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        head += "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode())
        chunk = b'{"task":"echo","args":["' + b"x" * (64 * 1024 - 24)
        filler = b"x" * len(chunk)
        sent = 0
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                data = chunk if sent == 0 else filler
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                sent += len(data)
            else:
                sock.sendall(b'"]}\r\n0\r\n\r\n')
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server answered and closed: read its answer
        received = b""
        try:
            while b"\r\n\r\n" not in received or len(received) < _expected(received):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        sock.close()
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return status, fields, body, sent


def _expected(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 1 << 62  # no length: read until the server closes


class RssPeak:
    """The peak resident memory of a process while the block runs, sampled
    every few milliseconds from a thread."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.baseline = self.peak = process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.baseline) / MiB

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()


def test_streamed_bodies_of_10_and_100_mb_get_413_without_growing_the_app(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("size")
    process = psutil.Process(sec_server.proc.pid)
    runs_before = len(httpx.get(f"{sec_server.api}/runs", headers=BEARER).json()["runs"])
    attempts = [("/runs", 10 * MiB), ("/worker/reports", 10 * MiB), ("/runs", 100 * MiB)]
    peak_delta = 0.0
    for path, total in attempts:
        with RssPeak(process) as rss:
            status, headers, body, sent = post_streamed(sec_server.api, path, total, BEARER)
        delta = rss.delta_mb
        peak_delta = max(peak_delta, delta)
        figures.bad_inputs_tried += 1
        name = f"{total // MiB} MB streamed to {path}"
        if status >= 500 or status == 0:
            figures.server_errors += 1
            figures.problems.append(f"{name}: {status}")
        elif status == 413 and headers.get("content-type", "").startswith("application/json"):
            figures.rejected_cleanly += 1
            assert json.loads(body)["error"] == "payload_too_large"
        else:
            figures.wrong(f"{name}: {status}")
        figures.extra[f"{name}: sent_mb_before_refusal"] = round(sent / MiB, 2)
        figures.extra[f"{name}: rss_delta_mb"] = round(delta, 1)
        assert status == 413, (name, status, body[:200])
        if total == 100 * MiB:
            assert delta < 50, f"the app grew by {delta:.1f} MB during a 100 MB body"
    figures.extra["max_rss_delta_mb"] = round(peak_delta, 1)
    runs_after = len(httpx.get(f"{sec_server.api}/runs", headers=BEARER).json()["runs"])
    assert runs_after == runs_before
    figures.assert_clean()


FORGERIES = [
    '\n\nevent: runs\ndata: [{"id":"00000000-0000-4000-8000-000000000000","task":"add",'
    '"attempt":1,"lease_token":"x","args":[1,2],"kwargs":{}}]\n\n',
    "\r\nevent: bye\r\ndata: {}\r\n\r\n",
    "\rdata: x\r\r: comment\r\revent: end\r\r",
    "id: 5\nretry: 1\n\n",
]


def test_sse_framing_cannot_be_forged_through_arguments_or_results(
    sec_server: SecServer, tally: Any
) -> None:
    figures = tally("sse")
    run_ids = {sec_server.submit("echo", value): value for value in FORGERIES}
    deliveries: dict[str, dict[str, Any]] = {}
    events: list[str] = []
    headers = {**BEARER, "X-Worker-Id": "framing"}
    with (
        sec_server.client() as http,
        http.stream(
            "GET", "/feed", params={"task": "echo", "slots": 10}, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        reader = SseReader(response)
        deadline = time.monotonic() + 20
        while set(deliveries) < set(run_ids):
            assert time.monotonic() < deadline, f"runs not delivered: {events}"
            event = reader.next()
            assert event is not None, "the feed ended early"
            name, data = event
            events.append(name)
            if name == "runs":
                for delivery in json.loads(data):
                    deliveries[delivery["id"]] = delivery
            else:
                json.loads(data)
        unexpected = list(reader.unexpected)
    assert events == ["hello", "runs"], events
    for run_id, value in run_ids.items():
        figures.bad_inputs_tried += 1
        if deliveries[run_id]["args"] != [value] or unexpected:
            figures.wrong(f"feed framing: {deliveries[run_id]['args']!r} {unexpected}")
        else:
            figures.rejected_cleanly += 1
    assert set(deliveries) == set(run_ids), "a forged run was delivered"

    reports = [
        {
            "run_id": run_id,
            "lease_token": deliveries[run_id]["lease_token"],
            "state": "COMPLETED",
            "result": value,
        }
        for run_id, value in run_ids.items()
    ]
    response = httpx.post(
        f"{sec_server.api}/worker/reports",
        json={"worker_id": "framing", "reports": reports},
        headers=BEARER,
    )
    assert response.json() == {"outcomes": ["accepted"] * len(reports)}, response.text
    with sec_server.client() as http:
        for run_id, value in run_ids.items():
            with http.stream("GET", f"/runs/{run_id}/events") as response:
                reader = SseReader(response)
                streamed = []
                while (event := reader.next()) is not None:
                    streamed.append(event)
            names = [name for name, _ in streamed]
            document = json.loads(streamed[0][1]) if streamed else {}
            figures.bad_inputs_tried += 1
            if names != ["state", "end"] or reader.unexpected or document.get("result") != value:
                figures.wrong(f"run events framing: {names} {reader.unexpected}")
            else:
                figures.rejected_cleanly += 1
            assert names == ["state", "end"], streamed
            assert sec_server.run(run_id)["result"] == value
    figures.assert_clean()


# -- loopback trust over a real server: proxies, rebinding, other sites ----------

PROXY_HEADERS = {
    "X-Forwarded-For": "198.51.100.7",
    "Forwarded": "for=198.51.100.7",
    "X-Real-IP": "198.51.100.7",
    "CF-Connecting-IP": "198.51.100.7",
    "True-Client-IP": "198.51.100.7",
    "Via": "1.1 edge",
    "X-Forwarded-Host": "app.example",
    "X-Client-IP": "198.51.100.7",
    "Fastly-Client-IP": "198.51.100.7",
}


def test_loopback_trust_refuses_proxied_and_rebound_requests(
    open_server: SecServer, tally: Any
) -> None:
    figures = tally("auth")
    run_id = open_server.submit("add", 1, 2)
    heartbeat = {"worker_id": "w", "runs": []}
    port = urlsplit(open_server.base).port
    with open_server.client("127.0.0.7") as http:
        assert http.get("/runs").status_code == 200  # a local client, named locally
        answers = {}
        for name, value in PROXY_HEADERS.items():
            answers[f"list via {name}"] = refusal(http, "GET", "/runs", headers={name: value})
            answers[f"heartbeat via {name}"] = refusal(
                http, "POST", "/worker/heartbeat", json=heartbeat, headers={name: value}
            )
        # DNS rebinding: a page of rebound.example whose name now resolves
        # to 127.0.0.1 reads with the page's own Host.
        for host in (f"rebound.example:{port}", "rebound.example", f"127.0.0.1.nip.io:{port}"):
            answers[f"list as {host}"] = refusal(http, "GET", "/runs", headers={"Host": host})
            answers[f"history as {host}"] = refusal(
                http, "GET", f"/runs/{run_id}/history", headers={"Host": host}
            )
    for name, answer in answers.items():
        count_answer(figures, name, answer)
        assert answer.status == 401, (name, answer)
    if open_server.run(run_id)["state"] != "SCHEDULED":
        figures.wrong("a refused request changed the run")
    figures.assert_clean()


def test_a_cross_site_form_or_fetch_cannot_cancel_or_submit(
    open_server: SecServer, tally: Any
) -> None:
    figures = tally("auth")
    run_id = open_server.submit("add", 1, 2)
    evil = "http://evil.example"
    attempts: dict[str, dict[str, Any]] = {
        "form cancel": {
            "url": f"/runs/{run_id}/cancel",
            "headers": {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": evil,
                "Sec-Fetch-Site": "cross-site",
            },
            "content": b"",
        },
        "form cancel, old browser": {
            "url": f"/runs/{run_id}/cancel",
            "headers": {"Content-Type": "application/x-www-form-urlencoded", "Origin": evil},
            "content": b"x=1",
        },
        "no-cors fetch cancel": {
            "url": f"/runs/{run_id}/cancel",
            "headers": {"Origin": evil, "Sec-Fetch-Site": "cross-site"},
        },
        "no-cors fetch cancel, old browser": {
            "url": f"/runs/{run_id}/cancel",
            "headers": {"Origin": evil},
        },
        "text/plain submit": {
            "url": "/runs",
            "headers": {"Content-Type": "text/plain", "Origin": evil},
            "content": json.dumps({"task": "add", "args": [1, 2]}).encode(),
        },
        "untyped blob submit": {
            "url": "/runs",
            "headers": {"Origin": evil},
            "content": json.dumps({"task": "add", "args": [1, 2]}).encode(),
        },
    }
    with open_server.client("127.0.0.8") as http:
        before = len(http.get("/runs", params={"limit": 500}).json()["runs"])
        for name, attempt in attempts.items():
            answer = refusal(
                http,
                "POST",
                attempt["url"],
                headers=attempt["headers"],
                content=attempt.get("content"),
            )
            count_answer(figures, name, answer)
            assert answer.status in (403, 415), (name, answer)
        after = len(http.get("/runs", params={"limit": 500}).json()["runs"])
        if open_server.run(run_id)["state"] != "SCHEDULED":
            figures.wrong("a cross-site request cancelled the run")
        # The app's own page (same origin) still cancels.
        own = http.post(
            f"/runs/{run_id}/cancel",
            headers={"Origin": open_server.base, "Sec-Fetch-Site": "same-origin"},
        )
    if after != before:
        figures.wrong("a cross-site submit stored a run")
    assert own.status_code == 200, own.text
    figures.assert_clean()
