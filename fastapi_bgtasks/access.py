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
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request

from .errors import AccessDenied, BgTasksError

if TYPE_CHECKING:
    from .app import BgTasks

__all__ = ["operator_access", "operator_check", "worker_access"]

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


def worker_access(hub: BgTasks) -> Callable[[Request], Awaitable[None]]:
    """The check on /feed and /worker/*: runs before any response starts."""

    async def check_worker(request: Request) -> None:
        if hub.token:
            if not _bearer_ok(request, hub.token):
                raise AccessDenied("Worker routes need `Authorization: Bearer <BGTASKS_TOKEN>`.")
        elif not is_loopback(request):
            raise AccessDenied(
                "No BGTASKS_TOKEN is configured, so worker routes serve loopback clients only."
            )

    return check_worker


def _capture(dependency: Any) -> Callable[..., Awaitable[BaseException | None]]:
    """Wrap the host's auth dependency so it reports instead of raising.

    The wrapper keeps the dependency's signature, so FastAPI still resolves
    its own parameters (headers, security schemes, sub-dependencies).
    """
    func = getattr(dependency, "dependency", dependency)
    if func is None or not callable(func):
        raise TypeError("auth= must be Depends(callable) or a callable")

    async def captured(**kwargs: Any) -> BaseException | None:
        try:
            outcome = func(**kwargs)
            if inspect.isawaitable(outcome):
                await outcome
        except (HTTPException, BgTasksError) as exc:
            return exc
        return None

    captured.__signature__ = inspect.signature(func).replace(  # type: ignore[attr-defined]
        return_annotation=Any
    )
    return captured


def operator_check(hub: BgTasks) -> Callable[..., Awaitable[BaseException | None]]:
    """A dependency answering None when the caller passes the operator check,
    else the exception that says why not (raised by `operator_access`)."""
    if hub.auth is None:

        async def loopback_only(request: Request) -> BaseException | None:
            if _bearer_ok(request, hub.token) or is_loopback(request):
                return None
            return AccessDenied(
                "No auth= dependency is configured, so operator routes serve loopback clients only."
            )

        return loopback_only

    captured = _capture(hub.auth)

    params = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)]
    params += [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(captured).parameters.values()
        if p.name != "request"
    ]
    inner_names = set(inspect.signature(captured).parameters)

    async def host_auth_call(**kwargs: Any) -> BaseException | None:
        # A worker's token is also an operator credential: tasks submit runs.
        request = kwargs["request"]
        if _bearer_ok(request, hub.token):
            return None
        return await captured(**{k: v for k, v in kwargs.items() if k in inner_names})

    host_auth_call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=Any
    )
    return host_auth_call


def operator_access(hub: BgTasks) -> Callable[..., Awaitable[None]]:
    """The check on operator routes: raise what the operator check reported."""
    from fastapi import Depends

    check = operator_check(hub)

    async def require_operator(denied: Any = Depends(check)) -> None:
        if denied is not None:
            raise denied

    return require_operator
