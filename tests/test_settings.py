"""The hub's options, validated once when `BgTasks(...)` is built: each bad
value raises `ConfigurationError` naming its option, and the environment
fills in only what the arguments leave out. No database. One behaviour per test."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

from fastapi_bgtasks import BgTasks, ConfigurationError
from fastapi_bgtasks.settings import DEFAULT_DATABASE_URL, MiB, Settings

URL = "sqlite+aiosqlite:///./never-opened.db"

# One bad value at least for every keyword of BgTasks; the message must
# name the option (the second item) so a person knows what to fix.
BAD_OPTIONS: list[tuple[str, Any, str]] = [
    ("database_url", 5, "database_url"),
    ("lease_seconds", 0, "lease_seconds"),
    ("lease_seconds", -1.0, "lease_seconds"),
    ("lease_seconds", math.nan, "lease_seconds"),
    ("lease_seconds", "30", "lease_seconds"),
    ("lease_seconds", True, "lease_seconds"),
    ("heartbeat_seconds", 0, "heartbeat_seconds"),
    ("heartbeat_seconds", 15.0, "heartbeat_seconds"),
    ("report_interval", -0.1, "report_interval"),
    ("report_interval", math.inf, "report_interval"),
    ("max_rescues", -1, "max_rescues"),
    ("max_rescues", 1.5, "max_rescues"),
    ("token", 1234, "token"),
    ("auth", "admin", "auth"),
    ("url", "127.0.0.1:8000/tasks", "url"),
    ("url", 8000, "url"),
    ("max_body_bytes", 0, "max_body_bytes"),
    ("max_args_bytes", 0, "max_args_bytes"),
    ("max_args_bytes", 1.0, "max_args_bytes"),
    ("max_result_bytes", -5, "max_result_bytes"),
    ("poll_seconds", 0, "poll_seconds"),
    ("reaper_seconds", -1, "reaper_seconds"),
    ("feed_max_seconds", math.inf, "feed_max_seconds"),
    ("max_feeds", 0, "max_feeds"),
    ("max_streams", 0, "max_streams"),
    ("max_streams_per_client", 0, "max_streams_per_client"),
    ("max_streams_per_client", 2.0, "max_streams_per_client"),
    ("max_streams_per_run", 0, "max_streams_per_run"),
    ("max_streams_per_run", True, "max_streams_per_run"),
    ("max_list_limit", 0, "max_list_limit"),
    ("max_page_bytes", 0, "max_page_bytes"),
    ("pool_size", 0, "pool_size"),
    ("pool_size", None, "pool_size"),
    ("trust_loopback", "yes", "trust_loopback"),
    ("trust_loopback", 1, "trust_loopback"),
    ("trust_loopback", None, "trust_loopback"),
    ("loopback_hosts", "app.local", "loopback_hosts"),
    ("loopback_hosts", ["http://app.local"], "loopback_hosts"),
    ("loopback_hosts", ["app.local:8000"], "loopback_hosts"),
    ("loopback_hosts", ["*.local"], "loopback_hosts"),
    ("loopback_hosts", [""], "loopback_hosts"),
]


@pytest.fixture(autouse=True)
def _no_bgtasks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BGTASKS_DATABASE_URL", "BGTASKS_URL", "BGTASKS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def hub_options() -> set[str]:
    return set(inspect.signature(BgTasks.__init__).parameters) - {"self"}


@pytest.mark.parametrize(
    ("option", "value", "named"), BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS]
)
def test_a_bad_option_raises_a_configuration_error_naming_it(
    option: str, value: Any, named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        BgTasks(**{"database_url": URL, option: value})


def test_every_hub_option_has_a_bad_value_that_is_refused() -> None:
    assert {option for option, _, _ in BAD_OPTIONS} == hub_options()


def test_settings_build_takes_exactly_the_hubs_options() -> None:
    built = set(inspect.signature(Settings.build).parameters) - {"cls"}
    assert built == hub_options()


def test_the_defaults_are_the_documented_ones() -> None:
    settings = BgTasks().settings
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.lease_seconds == 30.0
    assert settings.heartbeat_seconds == 7.5
    assert settings.reaper_seconds == 5.0
    assert settings.max_rescues == 3
    assert settings.max_args_bytes == settings.max_result_bytes == MiB
    assert settings.token is None and settings.remote_url is None and settings.auth is None


def test_settings_are_frozen() -> None:
    settings = BgTasks(URL).settings
    with pytest.raises(AttributeError):
        settings.lease_seconds = 1.0  # type: ignore[misc]


def test_the_environment_fills_in_the_url_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGTASKS_URL", "http://127.0.0.1:8000/tasks")
    monkeypatch.setenv("BGTASKS_TOKEN", "from-env")
    settings = BgTasks(URL).settings
    assert settings.remote_url == "http://127.0.0.1:8000/tasks"
    assert settings.token == "from-env"


def test_an_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGTASKS_TOKEN", "from-env")
    assert BgTasks(URL, token="from-argument").settings.token == "from-argument"


def test_an_empty_token_argument_means_no_token_even_with_one_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BGTASKS_TOKEN", "from-env")
    assert BgTasks(URL, token="").settings.token is None


def test_a_bgtasks_url_that_is_not_http_raises_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGTASKS_URL", "tasks.internal:8000")
    with pytest.raises(ConfigurationError, match="BGTASKS_URL"):
        BgTasks(URL)


def test_a_heartbeat_defaults_to_a_quarter_of_the_lease() -> None:
    assert BgTasks(URL, lease_seconds=8).settings.heartbeat_seconds == 2.0


@pytest.mark.parametrize(
    ("options", "workers", "operators"),
    [
        ({}, True, True),
        ({"token": "t"}, False, True),
        ({"auth": print}, True, False),
        ({"token": "t", "auth": print}, False, False),
        ({"token": "t", "trust_loopback": False}, False, False),
        ({"trust_loopback": False}, False, False),
    ],
    ids=["nothing", "token", "auth", "both", "token, trust off", "trust off"],
)
def test_local_clients_stand_in_only_for_a_credential_not_configured(
    options: dict[str, Any], workers: bool, operators: bool
) -> None:
    settings = BgTasks(URL, **options).settings
    assert (settings.loopback_workers, settings.loopback_operators) == (workers, operators)


def test_loopback_hosts_are_kept_as_bare_lower_case_names() -> None:
    hosts = BgTasks(URL, loopback_hosts=["App.Local", "[fd00::1]"]).settings.loopback_hosts
    assert hosts == frozenset({"app.local", "fd00::1"})
