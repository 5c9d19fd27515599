"""Who may call which route: workers by bearer token, operators through the
host's `auth=` dependency, frontends by holding a run id (a capability).

With no token (or no `auth`) configured, the matching routes serve loopback
clients only, and only when no proxy header says the request came from
further away.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.utils import get_dependant, solve_dependencies

from ..errors import AccessDenied, BgTasksError, RateLimited
from .context import Hub
from .throttle import FailureThrottle  # the hub still imports it from here

__all__ = [
    "OPERATOR",
    "WORKER",
    "FailureThrottle",
    "OperatorVerdict",
    "check_operator",
    "check_worker",
    "host_auth",
    "require_operator",
]

_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def is_loopback(request: Request) -> bool:
    if any(h in request.headers for h in _PROXY_HEADERS):
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer_ok(request: Request, token: str | None) -> bool:
    if not token:
        return False
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


async def check_worker(request: Request, hub: Hub) -> None:
    """The check on /feed and /worker/*: runs before any response starts."""
    throttle = hub.auth_throttle
    client = _client(request)
    throttle.check(client)
    if hub.settings.token:
        if not _bearer_ok(request, hub.settings.token):
            throttle.failed(client)
            raise AccessDenied("Worker routes need `Authorization: Bearer <BGTASKS_TOKEN>`.")
    elif not is_loopback(request):
        throttle.failed(client)
        raise AccessDenied(
            "No BGTASKS_TOKEN is configured, so worker routes serve loopback clients only."
        )


HostCheck = Callable[[Request], Awaitable[BaseException | None]]


def _host_check(dependency: Any) -> HostCheck:
    """Run the host's auth dependency for a request and report its verdict.

    FastAPI resolves the dependency's own parameters (headers, security
    schemes, sub-dependencies) here rather than in the route, so a missing
    credential means "not an operator" instead of a 422: capability routes
    must still answer a caller that holds only the run id.
    """
    func = getattr(dependency, "dependency", dependency)
    if func is None or not callable(func):
        raise TypeError("auth= must be Depends(callable) or a callable")
    dependant = get_dependant(path="", call=func)

    async def check(request: Request) -> BaseException | None:
        try:
            async with AsyncExitStack() as stack:
                solved = await solve_dependencies(
                    request=request,
                    dependant=dependant,
                    async_exit_stack=stack,
                    embed_body_fields=False,
                )
                if solved.errors:
                    return AccessDenied("The operator credential is missing or malformed.")
                outcome = func(**solved.values)
                if inspect.isawaitable(outcome):
                    await outcome
        except (HTTPException, BgTasksError) as exc:
            return exc
        return None

    return check


def host_auth(auth: Any) -> HostCheck | None:
    """The host's `auth=` dependency made ready to run per request (once per
    app: `build_app` keeps it in the sub-app's state), or None without one."""
    return _host_check(auth) if auth is not None else None


async def check_operator(request: Request, hub: Hub) -> BaseException | None:
    """None when the caller passes the operator check, else the exception
    that says why not (raised by `require_operator`).

    The worker's token is also an operator credential: tasks submit runs.
    """
    host: HostCheck | None = request.app.state.host_auth
    throttle = hub.auth_throttle
    token = hub.settings.token
    presented = request.headers.get("authorization", "").lower().startswith("bearer ")
    # With no host auth, a bearer token here can only be the worker's: a
    # wrong one counts as on worker routes (no way around the limit on
    # guesses). A host auth may use bearer tokens of its own: not counted.
    guarded = bool(token) and host is None and presented
    if guarded:
        try:
            throttle.check(_client(request))
        except RateLimited as exc:
            return exc
    if _bearer_ok(request, token):
        return None
    if guarded:
        throttle.failed(_client(request))
    if host is not None:
        return await host(request)
    if is_loopback(request):
        return None
    return AccessDenied(
        "No auth= dependency is configured, so operator routes serve loopback clients only."
    )


OperatorVerdict = Annotated[BaseException | None, Depends(check_operator)]
"""A handler parameter: None for an operator, else why the caller is not one."""


async def require_operator(denied: OperatorVerdict) -> None:
    """The check on operator routes: raise what the operator check reported."""
    if denied is not None:
        raise denied


OPERATOR = (Depends(require_operator),)
"""The `dependencies=` of an operator route."""

WORKER = (Depends(check_worker),)
"""The `dependencies=` of a worker route."""
