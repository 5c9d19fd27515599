"""When a submitted run becomes due, and how it is told apart: countdown or
eta, idempotency key and priority as one value, checked once where the call
is made (Python or `POST /runs`), so nothing out of range reaches the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import InvalidSchedule

__all__ = ["MAX_DELAY_SECONDS", "NOW", "Schedule"]

# Ten years: far enough for any schedule, near enough that every instant in
# range converts to UTC and fits both databases' timestamp types.
MAX_DELAY_SECONDS = 10 * 365 * 86400
EARLIEST_ETA = datetime(1970, 1, 1, tzinfo=UTC)
MAX_KEY_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Schedule:
    """`countdown` seconds or an aware `eta` (not both), an idempotency key
    (a repeat returns the stored run) and a priority (higher runs first).
    Raises `InvalidSchedule` when built from values out of range."""

    countdown: float | None = None
    eta: datetime | None = None
    idempotency_key: str | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.countdown is not None and self.eta is not None:
            raise InvalidSchedule("Pass countdown or eta, not both.")
        if self.countdown is not None and not _is_delay(self.countdown):
            raise InvalidSchedule("countdown must be between 0 seconds and 10 years.")
        if self.eta is not None:
            _check_eta(self.eta)
        key = self.idempotency_key
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH):
            raise InvalidSchedule(
                f"idempotency_key must be text of 1 to {MAX_KEY_LENGTH} characters."
            )
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise InvalidSchedule(f"priority must be a whole number, not {self.priority!r}.")
        if not (-(2**31) <= self.priority < 2**31):
            raise InvalidSchedule("priority must fit in 32 bits.")


NOW = Schedule()


def _is_delay(countdown: object) -> bool:
    return (
        isinstance(countdown, int | float)
        and not isinstance(countdown, bool)
        and 0 <= countdown <= MAX_DELAY_SECONDS
    )


def _check_eta(eta: datetime) -> None:
    if not isinstance(eta, datetime):
        raise InvalidSchedule(f"eta must be a datetime, not {eta!r}.")
    offset = eta.utcoffset()
    if offset is None:
        raise InvalidSchedule("eta must be timezone-aware (e.g. datetime.now(UTC)).")
    try:
        # Converted by hand: astimezone() raises OverflowError near year 1 and 9999.
        utc = eta.replace(tzinfo=None) - offset
    except OverflowError:
        utc = None
    latest = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=MAX_DELAY_SECONDS)
    if utc is None or not (EARLIEST_ETA.replace(tzinfo=None) <= utc <= latest):
        raise InvalidSchedule("eta must lie between 1970 and 10 years from now.")
