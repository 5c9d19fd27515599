"""The tables as SQLAlchemy objects, for building queries. The database's
schema itself is made by the frozen DDL of migrations.py; a test checks
that the two agree.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..states import ACTIVE_STATES, Event, RunState, sources_of

__all__ = ["ACTIVE", "SCHEDULED", "history", "metadata", "moves", "runs", "schema_table"]

metadata = sa.MetaData()

runs = sa.Table(
    "bgtasks_runs",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("rescues", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_rescues", sa.Integer, nullable=False),
    sa.Column("retry_delays", sa.JSON, nullable=False),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("kwargs", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("worker_id", sa.String(200), nullable=True),
    sa.Column("lease_token", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reason", sa.String(200), nullable=True),
    # Who last rejected the run while it waits: the fingerprint of that
    # worker's signature of the task (or its id); claims skip it for them.
    sa.Column("rejected_by", sa.String(200), nullable=True),
)

history = sa.Table(
    "bgtasks_run_history",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("run_id", sa.Uuid, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("reason", sa.String(200), nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

schema_table = sa.Table(
    "bgtasks_schema",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

# The two conditions most statements start from.
SCHEDULED = runs.c.state == RunState.SCHEDULED.value
ACTIVE = runs.c.state.in_(sorted(ACTIVE_STATES))


def moves(event: Event) -> Any:
    """The compare-and-set condition of `event`: the run is in one of the
    states states.EDGES lets that event move it out of."""
    return runs.c.state.in_(sorted(sources_of(event)))
