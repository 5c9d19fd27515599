"""Who may call which route: workers by bearer token, operators through the
host's `auth=` dependency, frontends by holding a run id (a capability).

A credential is checked before anything is counted: one that passes is never
refused by the throttle. Only refusals on routes that need a credential are
counted; a bearer sent to a capability route is not a credential there and
is ignored. Loopback clients stand in for a credential only as `Settings`
allows (`trust_loopback`), and only when no proxy header of any known kind
is present and the `Host` names this machine (or one of `loopback_hosts`).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.utils import get_dependant, solve_dependencies

from ..errors import AccessDenied, BgTasksError, RateLimited
from .context import Hub
from .throttle import FailureThrottle  # the hub still imports it from here

if TYPE_CHECKING:
    from .context import ServerHub

__all__ = [
    "OPERATOR",
    "PROXY_HEADERS",
    "WORKER",
    "FailureThrottle",
    "OperatorVerdict",
    "check_operator",
    "check_worker",
    "host_auth",
    "is_loopback",
    "require_operator",
]

PROXY_HEADERS = frozenset(
    {
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "client-ip",
        "forwarded-for",
        "cf-connecting-ip",
        "cf-connecting-ipv6",
        "true-client-ip",
        "fastly-client-ip",
        "x-original-forwarded-for",
        "x-envoy-external-address",
        "x-appengine-user-ip",
        "x-proxyuser-ip",
    }
)
"""Headers a proxy adds (with every `X-Forwarded-*`): any of them on a
request from a loopback address means the client may be anyone."""

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
"""`Host` names a loopback-trusted request may carry (with `loopback_hosts`)."""


def _proxied(request: Request) -> bool:
    return any(
        name in PROXY_HEADERS or name.startswith("x-forwarded-") for name in request.headers.keys()
    )


def _host_name(request: Request) -> str:
    """The `Host` header's name, lower-cased, without port or IPv6 brackets."""
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(request: Request, hosts: frozenset[str] = frozenset()) -> bool:
    """A request that loopback trust may serve: from a loopback address,
    through no proxy, naming this machine (or one of `hosts`) in `Host`, so
    a page whose DNS name was rebound to 127.0.0.1 is not served."""
    if _proxied(request):
        return False
    host = request.client.host if request.client else ""
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return False
    except ValueError:
        return False
    name = _host_name(request)
    return name in LOCAL_HOSTS or name in hosts


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _bearer_ok(request: Request, token: str | None) -> bool:
    """Constant time, whatever the lengths: the digests are compared."""
    if not token:
        return False
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        return False
    presented = value.strip().encode("latin-1", "replace")
    return hmac.compare_digest(_digest(presented), _digest(token.encode()))


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _counted(request: Request, hub: ServerHub, refusal: BaseException) -> BaseException:
    """What to answer a refused request: the refusal, counted against its
    address and credential, or 429 once the address is over the limit."""
    credential = request.headers.get("authorization", "").encode("latin-1", "replace")
    if hub.auth_throttle.refused(_client(request), credential):
        window = hub.auth_throttle.window
        return RateLimited(
            f"Too many refused credentials from this client; wait up to {window:.0f} s."
        )
    return refusal


async def check_worker(request: Request, hub: Hub) -> None:
    """The check on /feed and /worker/*: runs before any response starts."""
    settings = hub.settings
    if settings.token:
        if _bearer_ok(request, settings.token):
            return
        refusal = AccessDenied("Worker routes need `Authorization: Bearer <BGTASKS_TOKEN>`.")
    elif settings.loopback_workers and is_loopback(request, settings.loopback_hosts):
        return
    elif settings.loopback_workers:
        refusal = AccessDenied(
            "No BGTASKS_TOKEN is configured, so worker routes serve loopback clients only."
        )
    else:
        refusal = AccessDenied(
            "No BGTASKS_TOKEN is configured and trust_loopback is off: worker routes are closed."
        )
    raise _counted(request, hub, refusal)


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
    that says why not. Counts nothing: capability routes ask it only to
    decide how much of a document to show, and a bearer of the caller's own
    there is not a failure. `require_operator` counts the refusals.

    The worker's token is also an operator credential: tasks submit runs.
    """
    settings = hub.settings
    if _bearer_ok(request, settings.token):
        return None
    host: HostCheck | None = request.app.state.host_auth
    if host is not None:
        return await host(request)
    if settings.loopback_operators and is_loopback(request, settings.loopback_hosts):
        return None
    if settings.loopback_operators:
        return AccessDenied(
            "No auth= dependency is configured, so operator routes serve loopback clients only."
        )
    return AccessDenied(
        "Operator routes need the worker token (no auth= dependency is configured)."
        if settings.token
        else "No auth= dependency or token is configured and trust_loopback is off."
    )


OperatorVerdict = Annotated[BaseException | None, Depends(check_operator)]
"""A handler parameter: None for an operator, else why the caller is not one."""


async def require_operator(request: Request, hub: Hub, denied: OperatorVerdict) -> None:
    """The check on operator routes: raise what the operator check reported,
    counted against the caller (429 once it is over the limit)."""
    if denied is not None:
        raise _counted(request, hub, denied)


OPERATOR = (Depends(require_operator),)
"""The `dependencies=` of an operator route."""

WORKER = (Depends(check_worker),)
"""The `dependencies=` of a worker route."""
