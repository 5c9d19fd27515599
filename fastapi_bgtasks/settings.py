"""The hub's settings as one frozen value, built and validated once from
`BgTasks`' keyword arguments (and the environment, read here and at the
worker's CLI only), then handed to whatever needs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["DEFAULT_DATABASE_URL", "ENVELOPE_BYTES", "MiB", "Settings"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./bgtasks.db"
MiB = 1024 * 1024
# Room in a submit's body beyond its arguments (task name, options, spacing).
ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of a hub; `BgTasks`' docstring and docs/configuration.md
    say what each one means."""

    database_url: str
    lease_seconds: float
    heartbeat_seconds: float
    report_interval: float
    max_rescues: int
    token: str | None
    auth: Any
    remote_url: str | None
    max_body_bytes: int
    max_args_bytes: int
    max_result_bytes: int
    poll_seconds: float
    reaper_seconds: float
    feed_max_seconds: float
    max_feeds: int
    max_streams: int
    max_streams_per_client: int
    max_streams_per_run: int
    max_list_limit: int
    max_page_bytes: int
    pool_size: int
    loopback_workers: bool
    loopback_operators: bool
    loopback_hosts: frozenset[str]

    @property
    def worker_body_bytes(self) -> int:
        """The body limit of worker routes: room for one result of
        `max_result_bytes` plus its envelope and traceback."""
        return max(self.max_body_bytes, self.max_result_bytes + 256 * 1024)

    @classmethod
    def build(
        cls,
        database_url: str | None = None,
        *,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float | None = None,
        report_interval: float = 0.02,
        max_rescues: int = 3,
        token: str | None = None,
        auth: Any = None,
        url: str | None = None,
        max_body_bytes: int | None = None,
        max_args_bytes: int = MiB,
        max_result_bytes: int = MiB,
        poll_seconds: float = 1.0,
        reaper_seconds: float | None = None,
        feed_max_seconds: float = 300.0,
        max_feeds: int = 256,
        max_streams: int = 256,
        max_streams_per_client: int = 32,
        max_streams_per_run: int = 16,
        max_list_limit: int = 500,
        max_page_bytes: int = 4 * MiB,
        pool_size: int = 10,
        trust_loopback: bool = True,
        loopback_hosts: Iterable[str] = (),
    ) -> Settings:
        """Validate every option; a bad one raises `ConfigurationError` naming it."""
        lease = _positive("lease_seconds", lease_seconds)
        heartbeat = _heartbeat(lease, heartbeat_seconds)
        reaper = min(lease / 4, 5.0) if reaper_seconds is None else reaper_seconds
        worker_token = _option("token", token, "BGTASKS_TOKEN")
        workers, operators = _access(trust_loopback, worker_token, auth)
        body_bytes, args_bytes = _body_limits(max_body_bytes, max_args_bytes)
        return cls(
            database_url=_database_url(database_url),
            lease_seconds=lease,
            heartbeat_seconds=heartbeat,
            report_interval=_at_least("report_interval", report_interval, 0.0),
            max_rescues=_count("max_rescues", max_rescues, 0),
            token=worker_token,
            auth=auth,
            remote_url=_url(_option("url", url, "BGTASKS_URL")),
            max_body_bytes=body_bytes,
            max_args_bytes=args_bytes,
            max_result_bytes=_count("max_result_bytes", max_result_bytes, 1),
            poll_seconds=_positive("poll_seconds", poll_seconds),
            reaper_seconds=_positive("reaper_seconds", reaper),
            feed_max_seconds=_positive("feed_max_seconds", feed_max_seconds),
            max_feeds=_count("max_feeds", max_feeds, 1),
            max_streams=_count("max_streams", max_streams, 1),
            max_streams_per_client=_count("max_streams_per_client", max_streams_per_client, 1),
            max_streams_per_run=_count("max_streams_per_run", max_streams_per_run, 1),
            max_list_limit=_count("max_list_limit", max_list_limit, 1),
            max_page_bytes=_count("max_page_bytes", max_page_bytes, 1),
            pool_size=_count("pool_size", pool_size, 1),
            loopback_workers=workers,
            loopback_operators=operators,
            loopback_hosts=_hosts(loopback_hosts),
        )


def _database_url(value: Any) -> str:
    """The option, else `BGTASKS_DATABASE_URL`, else the embedded SQLite file."""
    return (
        _text("database_url", value)
        or _text("BGTASKS_DATABASE_URL", os.environ.get("BGTASKS_DATABASE_URL"))
        or DEFAULT_DATABASE_URL
    )


def _heartbeat(lease: float, heartbeat_seconds: Any) -> float:
    """A quarter of the lease by default: three chances to renew before a
    lease can expire."""
    heartbeat = _positive(
        "heartbeat_seconds", lease / 4 if heartbeat_seconds is None else heartbeat_seconds
    )
    if heartbeat >= lease / 2:
        raise ConfigurationError("heartbeat_seconds must be under half of lease_seconds")
    return heartbeat


def _body_limits(max_body_bytes: Any, max_args_bytes: Any) -> tuple[int, int]:
    """(max_body_bytes, max_args_bytes): by default a body carries the
    largest argument set and its envelope."""
    args_bytes = _count("max_args_bytes", max_args_bytes, 1)
    if max_body_bytes is None:
        return args_bytes + ENVELOPE_BYTES, args_bytes
    return _count("max_body_bytes", max_body_bytes, 1), args_bytes


def _access(trust: Any, token: str | None, auth: Any) -> tuple[bool, bool]:
    """Check `auth=`, then say where a local client stands in for a
    credential: (worker routes, operator routes). On (the default) only
    where that group has no credential configured: worker routes without a
    token, operator routes without `auth=`. False turns it off everywhere."""
    if auth is not None and not callable(getattr(auth, "dependency", auth)):
        raise ConfigurationError("auth= must be Depends(callable) or a callable")
    if not isinstance(trust, bool):
        raise ConfigurationError(f"trust_loopback must be True or False, not {trust!r}")
    if trust is False:
        return False, False
    return token is None, auth is None


def _hosts(value: Any) -> frozenset[str]:
    """`Host` names, lower-cased, without brackets; no ports, no wildcards."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"loopback_hosts must be a list of host names, not {value!r}")
    names = set()
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError(f"loopback_hosts: {item!r} is not a host name")
        name = item.strip().lower().removeprefix("[").removesuffix("]")
        if any(c in name for c in "/*@ \t") or (name.count(":") == 1):
            raise ConfigurationError(
                f"loopback_hosts: {item!r} must be a bare host name (no scheme, port or wildcard)"
            )
        names.add(name)
    return frozenset(names)


def _text(name: str, value: Any) -> str | None:
    """A string option; None and "" mean "not given"."""
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, not {value!r}")
    return value or None


def _option(name: str, value: Any, variable: str) -> str | None:
    """The argument if given (even ""), else the environment variable."""
    if value is not None:
        return _text(name, value)
    return _text(variable, os.environ.get(variable))


def _url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigurationError(
            f"url (or BGTASKS_URL) must be the http:// or https:// URL of the mounted "
            f"task API, not {value!r}"
        )
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number, not {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigurationError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ConfigurationError(f"{name} must be positive, not {value!r}")
    return number


def _at_least(name: str, value: Any, floor: float) -> float:
    number = _number(name, value)
    if number < floor:
        raise ConfigurationError(f"{name} must be at least {floor}, not {value!r}")
    return number


def _count(name: str, value: Any, floor: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be a whole number, not {value!r}")
    if value < floor:
        raise ConfigurationError(f"{name} must be at least {floor}, not {value!r}")
    return value
