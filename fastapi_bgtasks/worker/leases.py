"""Keeping the leases a worker holds: heartbeats renew them (and carry the
app's stop and cancel requests back), and fencing stops a run whose lease
may expire before it can be renewed, so this worker never runs beside the
one the run goes to next.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio

from ..errors import BgTasksError
from ..states import StopReason
from ..wire import HeartbeatResponse
from .config import FeedTerms
from .held import HeldRun, Roster

__all__ = ["Leases"]

log = logging.getLogger("fastapi_bgtasks.worker")

Heartbeat = Callable[[list[tuple[uuid.UUID, str]]], Awaitable[HeartbeatResponse]]


class Leases:
    """Renews the roster's leases through `heartbeat` (the API client's)."""

    def __init__(
        self,
        roster: Roster,
        heartbeat: Heartbeat,
        terms: Callable[[], FeedTerms],
    ) -> None:
        self.roster = roster
        self._heartbeat = heartbeat
        self._terms = terms

    async def run(self, connected: anyio.Event) -> None:
        """Beat every heartbeat interval, until cancelled; the timing is the
        feed's, so nothing happens before its first hello."""
        await connected.wait()
        while True:
            await anyio.sleep(self._terms().heartbeat_seconds)
            held = self.roster.all()
            if held:
                await self.beat(held)
            self.fence()

    async def beat(self, held: list[HeldRun]) -> None:
        sent_at = time.monotonic()
        sent = {h.delivery.id: h.delivery.lease_token for h in held}
        try:
            with anyio.fail_after(self._terms().request_timeout):
                answer = await self._heartbeat(list(sent.items()))
        except (BgTasksError, TimeoutError) as exc:
            log.warning("Heartbeat failed (%s: %s)", type(exc).__name__, exc)
            return
        renewed = set(answer.renewed)
        for h in held:
            if h.delivery.id in renewed and h.delivery.lease_token == sent[h.delivery.id]:
                h.last_renewed = sent_at
        for run_id in answer.stop:
            lost = self.roster.get(run_id)
            # Only if it still holds the lease we asked about (not a newer one).
            if (
                lost is not None
                and not lost.finished
                and lost.delivery.lease_token == sent.get(run_id)
            ):
                log.warning("Run %s: lease no longer ours; stopping it", run_id)
                lost.stop(StopReason.LOST)
        for run_id in answer.cancel:
            cancelled = self.roster.get(run_id)
            if cancelled is not None and not cancelled.finished:
                log.info("Run %s: cancel requested", run_id)
                cancelled.stop(StopReason.CANCEL)

    def fence(self) -> None:
        """Stop runs whose lease may expire before we can renew it."""
        terms = self._terms()
        limit = terms.lease_seconds - (terms.heartbeat_seconds + terms.request_timeout)
        now = time.monotonic()
        for h in self.roster.all():
            if not h.finished and now - h.last_renewed > limit:
                log.warning(
                    "Run %s: lease not renewed for %.1fs; stopping it before it expires",
                    h.delivery.id,
                    now - h.last_renewed,
                )
                h.stop(StopReason.LOST)
