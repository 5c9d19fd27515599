"""What a worker is told before it runs anything: `WorkerConfig` from its
command line (frozen, validated once), and `FeedTerms`, the timing and limits
the app's feed hello sets (the app's, never this process's hub's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigurationError
from ..wire import Hello

__all__ = ["PREFETCH_FACTOR", "FeedTerms", "SyncIsolation", "WorkerConfig"]

# Where a sync task runs: a child process the worker can stop (the default),
# or a thread of the worker's own (faster to start; cannot be stopped).
SyncIsolation = Literal["process", "thread"]

# The default prefetch, per unit of concurrency: deep enough that a worker
# of short tasks stays busy while its reports travel (the app frees credit
# only once a final report lands). The app shares a small batch among the
# feeds that serve it, so a deep window does not pile a few runs on one
# worker.
PREFETCH_FACTOR = 4


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker connects and how much it takes on. CLI flags map 1:1.
    `prefetch` None takes `PREFETCH_FACTOR` x `concurrency` runs ahead. `imports`: the
    modules the CLI imported to find the tasks; a sync run's child process
    imports them too, first."""

    url: str
    token: str | None = None
    concurrency: int = 10
    prefetch: int | None = None
    grace_seconds: float = 30.0
    max_result_bytes: int = 1024 * 1024
    handle_signals: bool = True
    max_reconnect_seconds: float = 10.0
    sync_isolation: SyncIsolation = "process"
    imports: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if self.prefetch is not None and self.prefetch < 0:
            raise ConfigurationError("prefetch must not be negative")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"--url must be the http(s) URL of the mounted task API, got {self.url!r}"
            )
        if self.max_reconnect_seconds <= 0:
            raise ConfigurationError("max_reconnect_seconds must be positive")
        if self.sync_isolation not in ("process", "thread"):
            raise ConfigurationError(
                f"sync_isolation must be 'process' or 'thread', got {self.sync_isolation!r}"
            )

    @property
    def slots(self) -> int:
        """Runs the feed may hand this worker at once: running and waiting."""
        prefetch = PREFETCH_FACTOR * self.concurrency if self.prefetch is None else self.prefetch
        return self.concurrency + prefetch


@dataclass(frozen=True)
class FeedTerms:
    """The timing and limits of the app a worker is connected to. Until the
    first hello, the package's defaults."""

    lease_seconds: float = 30.0
    heartbeat_seconds: float = 7.5
    report_interval: float = 0.02
    max_body_bytes: int = 1024 * 1024
    max_result_bytes: int = 1024 * 1024
    # Upper bound of (the app's monotonic clock - ours); None when the hello
    # carried no clock.
    clock_offset: float | None = None
    # The app takes REJECTED reports (older apps do not).
    takes_rejected: bool = False

    @classmethod
    def from_hello(cls, hello: Hello, config: WorkerConfig, *, asked_at: float) -> FeedTerms:
        """`asked_at`: our clock just before asking for the feed. The hello
        was written later by the app's clock, so `hello.clock - asked_at`
        is never too small: ages computed with it are never too young."""
        return cls(
            lease_seconds=hello.lease_seconds,
            heartbeat_seconds=hello.heartbeat_seconds,
            report_interval=hello.report_interval,
            max_body_bytes=hello.max_body_bytes,
            max_result_bytes=min(config.max_result_bytes, hello.max_result_bytes),
            clock_offset=hello.clock - asked_at if hello.clock is not None else None,
            takes_rejected=hello.takes_rejected,
        )

    @property
    def lease_margin(self) -> float:
        """How long before the app can take a lease back this worker must
        have stopped its run: a fifth of the lease, at least 1 s (a quarter
        of a lease under 4 s)."""
        return max(self.lease_seconds / 5, min(1.0, self.lease_seconds / 4))

    def hard_deadline(self, renewed_at: float) -> float:
        """When a run whose lease was last known good at `renewed_at` (our
        monotonic clock, taken before the renewal was asked for) must have
        stopped: a sync run's process is killed then, and kills itself if
        we cannot; an async run takes no further step after it."""
        return renewed_at + self.lease_seconds - self.lease_margin

    @property
    def request_timeout(self) -> float:
        """How long a heartbeat may take: a sixth of a lease, within [0.2, 5] s."""
        return max(0.2, min(5.0, self.lease_seconds / 6))
