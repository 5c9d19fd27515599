"""Who may call which route (server/access.py): worker tokens, loopback-only
defaults, the host's `auth=` dependency and capability reads."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi import Depends, Header, HTTPException

from fastapi_bgtasks import BgTasks
from fastapi_bgtasks.server.throttle import FailureThrottle
from tests.server.apikit import (
    TOKEN,
    api,
    assert_error,
    claim,
    client,
    make_hub,
    serving,
    stored_runs,
    submit,
)

pytestmark = pytest.mark.anyio

# -- worker access -------------------------------------------------------------

BAD_WORKER_HEADERS = {
    "no header": {},
    "wrong token": {"Authorization": "Bearer wrong"},
    "empty bearer": {"Authorization": "Bearer "},
    "other scheme": {"Authorization": f"Basic {TOKEN}"},
    "token without scheme": {"Authorization": TOKEN},
}


@pytest.mark.parametrize("headers", BAD_WORKER_HEADERS.values(), ids=BAD_WORKER_HEADERS.keys())
async def test_a_report_without_the_worker_token_is_a_401_and_changes_nothing(
    db_url: str, headers: dict[str, str]
) -> None:
    async with api(db_url, token=TOKEN) as (hub, http):
        run_id = await submit(http, headers={"Authorization": f"Bearer {TOKEN}"})
        lease_token = await claim(hub)
        response = await http.post(
            "/tasks/worker/reports",
            json={
                "worker_id": "w1",
                "reports": [
                    {
                        "run_id": run_id,
                        "lease_token": lease_token,
                        "state": "COMPLETED",
                        "result": 3,
                    }
                ],
            },
            headers=headers,
        )
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert_error(response, 401)
    assert stored["state"] == "PENDING"
    assert stored["result"] is None


@pytest.mark.parametrize("headers", BAD_WORKER_HEADERS.values(), ids=BAD_WORKER_HEADERS.keys())
async def test_a_heartbeat_without_the_worker_token_is_a_401(
    db_url: str, headers: dict[str, str]
) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []}, headers=headers
        )
    assert_error(response, 401)


async def test_a_heartbeat_with_the_worker_token_is_a_200(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat",
            json={"worker_id": "w1", "runs": []},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"renewed": [], "stop": [], "cancel": []}


async def test_the_worker_token_is_refused_in_the_query_string(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (_, http):
        response = await http.post(
            "/tasks/worker/heartbeat",
            params={"token": TOKEN, "access_token": TOKEN},
            json={"worker_id": "w1", "runs": []},
        )
    assert_error(response, 401)


async def test_a_report_with_the_worker_token_is_accepted(db_url: str) -> None:
    async with api(db_url, token=TOKEN) as (hub, http):
        run_id = await submit(http, headers={"Authorization": f"Bearer {TOKEN}"})
        lease_token = await claim(hub)
        response = await http.post(
            "/tasks/worker/reports",
            json={
                "worker_id": "w1",
                "reports": [
                    {
                        "run_id": run_id,
                        "lease_token": lease_token,
                        "state": "COMPLETED",
                        "result": 3,
                    }
                ],
            },
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert response.status_code == 200, response.text
    assert response.json() == {"outcomes": ["accepted"]}
    assert stored["state"] == "COMPLETED" and stored["result"] == 3


# -- loopback-only defaults ----------------------------------------------------


async def test_without_a_token_a_loopback_client_may_call_worker_routes(db_url: str) -> None:
    async with api(db_url) as (_, http):
        response = await http.post("/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []})
    assert response.status_code == 200, response.text


async def test_without_a_token_a_remote_client_gets_401_on_worker_routes(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote:
        response = await remote.post(
            "/tasks/worker/heartbeat", json={"worker_id": "w1", "runs": []}
        )
    assert_error(response, 401)


async def test_without_auth_a_remote_client_cannot_submit(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote, client(app) as local:
        response = await remote.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        assert_error(response, 401)
        assert await stored_runs(local) == []


async def test_without_auth_a_remote_client_cannot_list_runs(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote:
        response = await remote.get("/tasks/runs")
    assert_error(response, 401)


async def test_without_auth_a_remote_client_cannot_cancel_a_run(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app, remote=True) as remote, client(app) as local:
        run_id = await submit(local)
        response = await remote.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await local.get(f"/tasks/runs/{run_id}")).json()
    assert_error(response, 401)
    assert stored["state"] == "SCHEDULED"


@pytest.mark.parametrize(
    "proxy_header",
    [
        {"X-Forwarded-For": "198.51.100.7"},
        {"Forwarded": "for=198.51.100.7"},
        {"X-Real-IP": "198.51.100.7"},
    ],
    ids=["x-forwarded-for", "forwarded", "x-real-ip"],
)
async def test_a_loopback_client_behind_a_proxy_header_is_treated_as_remote(
    db_url: str, proxy_header: dict[str, str]
) -> None:
    async with api(db_url) as (_, http):
        worker = await http.post(
            "/tasks/worker/heartbeat",
            json={"worker_id": "w1", "runs": []},
            headers=proxy_header,
        )
        operator = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=proxy_header
        )
        assert await stored_runs(http) == []
    assert_error(worker, 401)
    assert_error(operator, 401)


# -- operator access through the host's auth dependency ------------------------


def check_admin(x_admin: str | None = Header(default=None)) -> None:
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="Operators only.")


def require_admin_header(x_admin: str = Header()) -> None:
    if x_admin != "yes":
        raise HTTPException(status_code=401, detail="Operators only.")


ADMIN = {"X-Admin": "yes"}


async def test_the_auth_dependency_refuses_a_submit_with_its_401_as_a_json_error(
    db_url: str,
) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listed = await http.get("/tasks/runs", headers=ADMIN)
    body = assert_error(response, 401)
    assert body["message"] == "Operators only."
    assert listed.json()["runs"] == []


async def test_the_auth_dependency_refuses_a_submit_even_from_loopback(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listed = await http.get("/tasks/runs", headers=ADMIN)
    assert_error(response, 401)
    assert listed.json()["runs"] == []


async def test_the_auth_dependency_accepts_a_submit_it_allows(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True, headers=ADMIN) as http:
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert response.status_code == 202, response.text


async def test_the_auth_dependency_guards_listing_and_cancelling(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as http:
        run_id = await submit(http, headers=ADMIN)
        listing = await http.get("/tasks/runs")
        cancel = await http.post(f"/tasks/runs/{run_id}/cancel")
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert_error(listing, 401)
    assert_error(cancel, 401)
    assert stored["state"] == "SCHEDULED"


async def test_the_worker_token_also_passes_operator_routes(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(hub) as app, client(app, remote=True, headers=bearer) as http:
        submitted = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
        listing = await http.get("/tasks/runs")
        cancel = await http.post(f"/tasks/runs/{submitted.json()['id']}/cancel")
    assert submitted.status_code == 202, submitted.text
    assert listing.status_code == 200, listing.text
    assert cancel.status_code == 200, cancel.text


async def test_a_wrong_worker_token_does_not_pass_operator_routes(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with (
        serving(hub) as app,
        client(app, remote=True, headers={"Authorization": "Bearer wrong"}) as http,
    ):
        response = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]})
    assert_error(response, 401)


# -- capability reads ----------------------------------------------------------


async def failed_run(hub: BgTasks, http: httpx.AsyncClient) -> str:
    """A run of `add` that FAILED with a traceback, reported over the worker route."""
    run_id = await submit(http)
    lease_token = await claim(hub)
    response = await http.post(
        "/tasks/worker/reports",
        json={
            "worker_id": "w1",
            "reports": [
                {
                    "run_id": run_id,
                    "lease_token": lease_token,
                    "state": "FAILED",
                    "error": {
                        "type": "ValueError",
                        "message": "boom",
                        "traceback": "Traceback (most recent call last): secret frames",
                    },
                }
            ],
        },
    )
    assert response.json() == {"outcomes": ["accepted"]}, response.text
    return run_id


async def test_a_capability_read_omits_arguments_and_traceback(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app) as local, client(app, remote=True) as remote:
        run_id = await failed_run(hub, local)
        response = await remote.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["state"] == "FAILED"
    assert doc["args"] is None and doc["kwargs"] is None
    assert doc["error"]["type"] == "ValueError"
    assert doc["error"]["message"] == "boom"
    assert doc["error"]["traceback"] is None
    assert "secret frames" not in response.text


async def test_an_operator_read_includes_arguments_and_traceback(db_url: str) -> None:
    hub = make_hub(db_url)
    async with serving(hub) as app, client(app) as local:
        run_id = await failed_run(hub, local)
        response = await local.get(f"/tasks/runs/{run_id}")
    doc = response.json()
    assert doc["args"] == [1, 2] and doc["kwargs"] == {}
    assert doc["error"]["traceback"] == "Traceback (most recent call last): secret frames"


async def test_a_capability_read_under_host_auth_omits_arguments(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, headers=ADMIN) as admin, client(app) as anyone:
        run_id = await submit(admin)
        full = (await admin.get(f"/tasks/runs/{run_id}")).json()
        response = await anyone.get(f"/tasks/runs/{run_id}")
    assert full["args"] == [1, 2]
    assert response.status_code == 200, response.text
    assert response.json()["args"] is None and response.json()["kwargs"] is None


async def test_a_capability_read_needs_nothing_the_host_auth_requires(db_url: str) -> None:
    hub = make_hub(db_url, auth=Depends(require_admin_header))
    async with serving(hub) as app, client(app, headers=ADMIN) as admin, client(app) as anyone:
        run_id = await submit(admin)
        response = await anyone.get(f"/tasks/runs/{run_id}")
    assert response.status_code == 200, response.text
    assert response.json()["args"] is None


# -- the limit on refused credentials --------------------------------------------

BEARER = {"Authorization": f"Bearer {TOKEN}"}
HEARTBEAT = {"worker_id": "w1", "runs": []}


def guess(n: int) -> dict[str, str]:
    return {"Authorization": f"Bearer guess-{n}"}


async def test_the_right_token_passes_from_an_address_over_the_limit(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN)
    async with serving(hub) as app, client(app, remote=True) as http:
        wrong = [
            (await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=guess(n)))
            for n in range(31)
        ]
        right = await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=BEARER)
        submitted = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=BEARER
        )
    assert [r.status_code for r in wrong] == [401] * 30 + [429]
    assert right.status_code == 200, right.text
    assert submitted.status_code == 202, submitted.text


async def test_with_auth_wrong_worker_tokens_on_operator_routes_get_429(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN, auth=Depends(check_admin))
    async with serving(hub) as app, client(app, remote=True) as http:
        answers = [
            (await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=guess(n)))
            for n in range(40)
        ]
        right = await http.post("/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=BEARER)
        admin = await http.get("/tasks/runs", headers=ADMIN)
    assert [r.status_code for r in answers] == [401] * 30 + [429] * 10
    assert_error(answers[-1], 429)
    assert right.status_code == 202, right.text
    # Whatever the host accepts passes too: only refusals are limited.
    assert admin.status_code == 200, admin.text
    assert len(admin.json()["runs"]) == 1


async def test_a_foreign_bearer_on_capability_reads_is_never_counted(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN)
    session = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2ln"}
    async with serving(hub) as app, client(app, remote=True) as http:
        run_id = await submit(http, headers=BEARER)
        reads = [(await http.get(f"/tasks/runs/{run_id}", headers=session)) for _ in range(40)]
        heartbeat = await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=BEARER)
        wrong = await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=guess(0))
    assert {r.status_code for r in reads} == {200}
    assert reads[-1].json()["args"] is None
    assert heartbeat.status_code == 200, heartbeat.text
    assert_error(wrong, 401)
    assert len(hub.auth_throttle) == 1


async def test_one_refused_credential_repeated_counts_once(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN)
    stale = {"Authorization": "Bearer an-old-token"}
    async with serving(hub) as app, client(app, remote=True) as http:
        answers = [
            (await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=stale))
            for _ in range(60)
        ]
    assert {r.status_code for r in answers} == {401}


def test_the_throttle_forgets_the_least_recent_address_first_without_scanning() -> None:
    throttle = FailureThrottle(limit=3, window=60.0, max_entries=1_000)
    for n in range(3):
        throttle.refused("203.0.113.1", f"guess-{n}".encode())
    assert throttle.limited("203.0.113.1")
    started = time.perf_counter()
    for n in range(50_000):  # the old throttle scanned every tracked address here
        throttle.refused(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", b"x")
    elapsed = time.perf_counter() - started
    assert len(throttle) == 1_000
    assert not throttle.limited("203.0.113.1")  # forgotten: the least recent
    assert elapsed < 2.0, elapsed


# -- the loopback-trust policy ----------------------------------------------------

MORE_PROXY_HEADERS = {
    "cf-connecting-ip": {"CF-Connecting-IP": "198.51.100.7"},
    "true-client-ip": {"True-Client-IP": "198.51.100.7"},
    "via": {"Via": "1.1 proxy.example"},
    "x-forwarded-host": {"X-Forwarded-Host": "app.example"},
    "x-forwarded-proto": {"X-Forwarded-Proto": "https"},
    "x-client-ip": {"X-Client-IP": "198.51.100.7"},
    "fastly-client-ip": {"Fastly-Client-IP": "198.51.100.7"},
}


@pytest.mark.parametrize("proxy_header", MORE_PROXY_HEADERS.values(), ids=MORE_PROXY_HEADERS.keys())
async def test_any_known_proxy_header_ends_loopback_trust(
    db_url: str, proxy_header: dict[str, str]
) -> None:
    async with api(db_url) as (_, http):
        worker = await http.post("/tasks/worker/heartbeat", json=HEARTBEAT, headers=proxy_header)
        listing = await http.get("/tasks/runs", headers=proxy_header)
        submitted = await http.post(
            "/tasks/runs", json={"task": "add", "args": [1, 2]}, headers=proxy_header
        )
        assert await stored_runs(http) == []
    assert_error(worker, 401)
    assert_error(listing, 401)
    assert_error(submitted, 401)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("[::1]:8000", True),
        ("LOCALHOST:80", True),
        ("rebound.example:8000", False),
        ("127.0.0.1.nip.io", False),
        ("app.local", False),
    ],
)
async def test_loopback_trust_needs_a_local_host_name(
    db_url: str, host: str, allowed: bool
) -> None:
    async with api(db_url) as (_, http):
        listing = await http.get("/tasks/runs", headers={"Host": host})
        heartbeat = await http.post(
            "/tasks/worker/heartbeat", json=HEARTBEAT, headers={"Host": host}
        )
    assert listing.status_code == (200 if allowed else 401), listing.text
    assert heartbeat.status_code == (200 if allowed else 401), heartbeat.text


async def test_loopback_hosts_adds_names_loopback_trust_accepts(db_url: str) -> None:
    async with api(db_url, loopback_hosts=["app.local"]) as (_, http):
        listing = await http.get("/tasks/runs", headers={"Host": "app.local:8000"})
        other = await http.get("/tasks/runs", headers={"Host": "other.local"})
    assert listing.status_code == 200, listing.text
    assert_error(other, 401)


async def test_trust_loopback_false_serves_no_local_client(db_url: str) -> None:
    async with api(db_url, trust_loopback=False) as (_, http):
        worker = await http.post("/tasks/worker/heartbeat", json=HEARTBEAT)
        listing = await http.get("/tasks/runs")
    assert_error(worker, 401)
    assert_error(listing, 401)


async def test_with_only_a_token_local_operators_need_it_once_trust_loopback_is_off(
    db_url: str,
) -> None:
    body = {"task": "add", "args": [1, 2]}
    async with api(db_url, token=TOKEN) as (_, http):
        trusted = await http.post("/tasks/runs", json=body)
    async with api(db_url, token=TOKEN, trust_loopback=False) as (_, http):
        anonymous = await http.post("/tasks/runs", json=body)
        with_token = await http.post("/tasks/runs", json=body, headers=BEARER)
    assert trusted.status_code == 202, trusted.text
    assert_error(anonymous, 401)
    assert with_token.status_code == 202, with_token.text


# -- no state change from another site ------------------------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    "headers",
    [
        FORM,
        {"Content-Type": "text/plain"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:9999"},
    ],
    ids=["form", "text", "multipart", "cross-site", "same-site", "origin", "null", "port"],
)
async def test_a_cross_site_cancel_is_refused_and_changes_nothing(
    db_url: str, headers: dict[str, str]
) -> None:
    async with api(db_url) as (_, http):
        run_id = await submit(http)
        response = await http.post(f"/tasks/runs/{run_id}/cancel", headers=headers)
        stored = (await http.get(f"/tasks/runs/{run_id}")).json()
    assert response.status_code in (403, 415), response.text
    assert_error(response, response.status_code)
    assert stored["state"] == "SCHEDULED"


async def test_a_same_origin_cancel_is_served(db_url: str) -> None:
    async with api(db_url) as (_, http):
        first, second = await submit(http), await submit(http)
        by_origin = await http.post(
            f"/tasks/runs/{first}/cancel", headers={"Origin": "http://127.0.0.1"}
        )
        by_fetch = await http.post(
            f"/tasks/runs/{second}/cancel",
            headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://elsewhere.example"},
        )
    assert by_origin.status_code == 200, by_origin.text
    assert by_fetch.status_code == 200, by_fetch.text


async def test_a_submit_in_another_media_type_is_a_415_and_stores_nothing(db_url: str) -> None:
    body = json.dumps({"task": "add", "args": [1, 2]})
    async with api(db_url) as (_, http):
        plain = await http.post("/tasks/runs", content=body, headers={"Content-Type": "text/plain"})
        untyped = await http.post("/tasks/runs", content=body)
        assert await stored_runs(http) == []
    assert_error(plain, 415)
    assert_error(untyped, 415)


async def test_a_cross_site_write_with_a_bearer_token_is_checked_as_usual(db_url: str) -> None:
    hub = make_hub(db_url, token=TOKEN)
    async with serving(hub) as app, client(app, remote=True) as http:
        response = await http.post(
            "/tasks/runs",
            json={"task": "add", "args": [1, 2]},
            headers={**BEARER, "Sec-Fetch-Site": "cross-site", "Origin": "https://ui.example"},
        )
    assert response.status_code == 202, response.text
