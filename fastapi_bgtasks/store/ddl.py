"""The schema's history as frozen DDL, one list of statements per version
and dialect. Forward-only: a released version is never edited (a database
made by any release must look the same at the same version); a change is
a new version appended at the end.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_TABLE"]

# Made by the runner before version 1: it records the version itself.
SCHEMA_TABLE = "CREATE TABLE bgtasks_schema (version INTEGER NOT NULL)"

# -- version 1: the runs table (the queue), its history, per-row history triggers

_V1_POSTGRESQL = [
    """
    CREATE TABLE bgtasks_run_history (
        id BIGSERIAL NOT NULL,
        run_id UUID NOT NULL,
        from_state VARCHAR(16),
        to_state VARCHAR(16) NOT NULL,
        attempt INTEGER NOT NULL,
        reason VARCHAR(200),
        at TIMESTAMP WITH TIME ZONE NOT NULL,
        PRIMARY KEY (id)
    )
    """,
    "CREATE INDEX bgtasks_run_history_run ON bgtasks_run_history (run_id, id)",
    """
    CREATE TABLE bgtasks_runs (
        id UUID NOT NULL,
        task VARCHAR(200) NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempt INTEGER DEFAULT '0' NOT NULL,
        max_attempts INTEGER NOT NULL,
        rescues INTEGER DEFAULT '0' NOT NULL,
        max_rescues INTEGER NOT NULL,
        retry_delays JSON NOT NULL,
        timeout_seconds FLOAT,
        priority INTEGER DEFAULT '0' NOT NULL,
        args JSON NOT NULL,
        kwargs JSON NOT NULL,
        result JSON,
        error JSON,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL,
        scheduled_at TIMESTAMP WITH TIME ZONE NOT NULL,
        started_at TIMESTAMP WITH TIME ZONE,
        finished_at TIMESTAMP WITH TIME ZONE,
        updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
        worker_id VARCHAR(200),
        lease_token VARCHAR(64),
        lease_expires_at TIMESTAMP WITH TIME ZONE,
        idempotency_key VARCHAR(200),
        cancel_requested BOOLEAN DEFAULT false NOT NULL,
        reason VARCHAR(200),
        PRIMARY KEY (id)
    )
    """,
    "CREATE UNIQUE INDEX bgtasks_runs_idempotency ON bgtasks_runs (task, idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX bgtasks_runs_leased ON bgtasks_runs (worker_id) "
    "WHERE state IN ('PENDING', 'RUNNING')",
    "CREATE INDEX bgtasks_runs_leases ON bgtasks_runs (lease_expires_at) "
    "WHERE state IN ('PENDING', 'RUNNING')",
    "CREATE INDEX bgtasks_runs_newest ON bgtasks_runs (created_at, id)",
    "CREATE INDEX bgtasks_runs_runnable ON bgtasks_runs (task, priority DESC, scheduled_at) "
    "WHERE state = 'SCHEDULED'",
    "CREATE INDEX bgtasks_runs_state_newest ON bgtasks_runs (state, created_at)",
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_transition() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
            VALUES (NEW.id, NULL, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
        ELSIF NEW.state IS DISTINCT FROM OLD.state THEN
            INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
            VALUES (NEW.id, OLD.state, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
        END IF;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER bgtasks_runs_history AFTER INSERT OR UPDATE OF state ON bgtasks_runs
    FOR EACH ROW EXECUTE FUNCTION bgtasks_record_transition()
    """,
]

_V1_SQLITE = [
    """
    CREATE TABLE bgtasks_run_history (
        id INTEGER NOT NULL,
        run_id CHAR(32) NOT NULL,
        from_state VARCHAR(16),
        to_state VARCHAR(16) NOT NULL,
        attempt INTEGER NOT NULL,
        reason VARCHAR(200),
        at DATETIME NOT NULL,
        PRIMARY KEY (id)
    )
    """,
    "CREATE INDEX bgtasks_run_history_run ON bgtasks_run_history (run_id, id)",
    """
    CREATE TABLE bgtasks_runs (
        id CHAR(32) NOT NULL,
        task VARCHAR(200) NOT NULL,
        state VARCHAR(16) NOT NULL,
        attempt INTEGER DEFAULT '0' NOT NULL,
        max_attempts INTEGER NOT NULL,
        rescues INTEGER DEFAULT '0' NOT NULL,
        max_rescues INTEGER NOT NULL,
        retry_delays JSON NOT NULL,
        timeout_seconds FLOAT,
        priority INTEGER DEFAULT '0' NOT NULL,
        args JSON NOT NULL,
        kwargs JSON NOT NULL,
        result JSON,
        error JSON,
        created_at DATETIME NOT NULL,
        scheduled_at DATETIME NOT NULL,
        started_at DATETIME,
        finished_at DATETIME,
        updated_at DATETIME NOT NULL,
        worker_id VARCHAR(200),
        lease_token VARCHAR(64),
        lease_expires_at DATETIME,
        idempotency_key VARCHAR(200),
        cancel_requested BOOLEAN DEFAULT 0 NOT NULL,
        reason VARCHAR(200),
        PRIMARY KEY (id)
    )
    """,
    "CREATE UNIQUE INDEX bgtasks_runs_idempotency ON bgtasks_runs (task, idempotency_key) "
    "WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX bgtasks_runs_leased ON bgtasks_runs (worker_id) "
    "WHERE state IN ('PENDING', 'RUNNING')",
    "CREATE INDEX bgtasks_runs_leases ON bgtasks_runs (lease_expires_at) "
    "WHERE state IN ('PENDING', 'RUNNING')",
    "CREATE INDEX bgtasks_runs_newest ON bgtasks_runs (created_at, id)",
    "CREATE INDEX bgtasks_runs_runnable ON bgtasks_runs (task, priority DESC, scheduled_at) "
    "WHERE state = 'SCHEDULED'",
    "CREATE INDEX bgtasks_runs_state_newest ON bgtasks_runs (state, created_at)",
    """
    CREATE TRIGGER bgtasks_runs_inserted AFTER INSERT ON bgtasks_runs BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (NEW.id, NULL, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
    END
    """,
    """
    CREATE TRIGGER bgtasks_runs_transition AFTER UPDATE OF state ON bgtasks_runs
    WHEN NEW.state IS NOT OLD.state BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (NEW.id, OLD.state, NEW.state, NEW.attempt, NEW.reason, NEW.updated_at);
    END
    """,
]

# -- version 2: the hot path. PostgreSQL's one-round-trip claim and history
# per statement; a RUNNING step in the history of runs completed straight
# from PENDING; an index of waiting runs by due time.

# The claim on PostgreSQL in one round trip. The per-worker advisory lock
# (0x6267 = 25191, with hashtext(worker_id)) must be taken before the
# snapshot that counts the worker's credit, so it cannot share a statement
# with the claim; inside a function each statement takes a fresh snapshot
# (READ COMMITTED), so one call does both.
_PG_CLAIM_FUNCTION = """
CREATE OR REPLACE FUNCTION bgtasks_claim(
    p_worker text, p_tasks text[], p_slots integer, p_lease double precision, p_token text
) RETURNS SETOF bgtasks_runs AS $$
DECLARE
    credit integer;
BEGIN
    PERFORM pg_advisory_xact_lock(25191, hashtext(p_worker));
    SELECT p_slots - count(*) INTO credit FROM bgtasks_runs
    WHERE worker_id = p_worker AND state IN ('PENDING', 'RUNNING');
    IF credit <= 0 THEN
        RETURN;
    END IF;
    -- = ANY(ARRAY(...)): the runs are looked up by id; an IN (subquery)
    -- with a LIMIT the planner cannot see made it scan the whole table.
    -- One index scan per task, each already in claim order, so a backlog
    -- of due runs is never sorted (task = ANY(...) sorted all of it).
    RETURN QUERY
    UPDATE bgtasks_runs SET
        state = 'PENDING', attempt = attempt + 1, worker_id = p_worker,
        lease_token = p_token, lease_expires_at = now() + make_interval(secs => p_lease),
        updated_at = now(), reason = NULL
    WHERE id = ANY(ARRAY(
        SELECT due.id FROM unnest(p_tasks) AS served(name) CROSS JOIN LATERAL (
            SELECT id, priority, scheduled_at FROM bgtasks_runs
            WHERE state = 'SCHEDULED' AND task = served.name AND scheduled_at <= now()
            ORDER BY priority DESC, scheduled_at
            LIMIT credit
            FOR UPDATE SKIP LOCKED) AS due
        ORDER BY due.priority DESC, due.scheduled_at
        LIMIT credit))
    RETURNING *;
END
$$ LANGUAGE plpgsql
"""

_DUE_INDEX = (
    "CREATE INDEX IF NOT EXISTS bgtasks_runs_due ON bgtasks_runs (scheduled_at) "
    "WHERE state = 'SCHEDULED'"
)

# History per statement: a bulk report or a claim of many runs records its
# transitions with one INSERT … SELECT over the transition tables, not one
# PL/pgSQL call per row. (A trigger with transition tables takes one event,
# so inserts and updates have one each.)
_V2_POSTGRESQL = [
    _PG_CLAIM_FUNCTION,
    "DROP TRIGGER IF EXISTS bgtasks_runs_history ON bgtasks_runs",
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_inserts() RETURNS trigger AS $$
    BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT n.id, NULL, n.state, n.attempt, n.reason, n.updated_at FROM inserted AS n;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE OR REPLACE FUNCTION bgtasks_record_updates() RETURNS trigger AS $$
    BEGIN
        -- A run that went from PENDING to COMPLETED was running: its
        -- history says so (see _SQLITE_TRANSITION_TRIGGER).
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT run_id, from_state, to_state, attempt, reason, at FROM (
            SELECT n.id AS run_id, o.state AS from_state, 'RUNNING' AS to_state,
                   n.attempt, NULL AS reason, n.updated_at AS at, 0 AS step
            FROM updated AS n JOIN previous AS o ON o.id = n.id
            WHERE o.state = 'PENDING' AND n.state = 'COMPLETED'
            UNION ALL
            SELECT n.id,
                   CASE WHEN o.state = 'PENDING' AND n.state = 'COMPLETED'
                        THEN 'RUNNING' ELSE o.state END,
                   n.state, n.attempt, n.reason, n.updated_at, 1
            FROM updated AS n JOIN previous AS o ON o.id = n.id
            WHERE n.state IS DISTINCT FROM o.state
        ) AS transitions
        ORDER BY run_id, step;
        RETURN NULL;
    END
    $$ LANGUAGE plpgsql
    """,
    """
    CREATE TRIGGER bgtasks_runs_inserted AFTER INSERT ON bgtasks_runs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION bgtasks_record_inserts()
    """,
    """
    CREATE TRIGGER bgtasks_runs_updated AFTER UPDATE ON bgtasks_runs
    REFERENCING OLD TABLE AS previous NEW TABLE AS updated
    FOR EACH STATEMENT EXECUTE FUNCTION bgtasks_record_updates()
    """,
    "DROP FUNCTION IF EXISTS bgtasks_record_transition()",
    _DUE_INDEX,
]

# SQLite's per-row transition trigger, with the same rule as PostgreSQL's:
# a worker that finishes a short run before its RUNNING report is sent sends
# only the COMPLETED one (one statement per batch instead of two), and the
# history still shows the run RUNNING.
_V2_SQLITE = [
    "DROP TRIGGER IF EXISTS bgtasks_runs_transition",
    """
    CREATE TRIGGER bgtasks_runs_transition AFTER UPDATE OF state ON bgtasks_runs
    WHEN NEW.state IS NOT OLD.state BEGIN
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        SELECT NEW.id, OLD.state, 'RUNNING', NEW.attempt, NULL, NEW.updated_at
        WHERE OLD.state = 'PENDING' AND NEW.state = 'COMPLETED';
        INSERT INTO bgtasks_run_history (run_id, from_state, to_state, attempt, reason, at)
        VALUES (
            NEW.id,
            CASE WHEN OLD.state = 'PENDING' AND NEW.state = 'COMPLETED'
                 THEN 'RUNNING' ELSE OLD.state END,
            NEW.state, NEW.attempt, NEW.reason, NEW.updated_at
        );
    END
    """,
    _DUE_INDEX,
]

# -- version 3: version skew. A run a worker rejected (it does not serve the
# task, or the arguments do not fit its signature) waits with `rejected_by`:
# the fingerprint of that worker's signature of the task, or its id. The
# claim skips it for every worker that would reject it the same way. On
# PostgreSQL a second bgtasks_claim takes each served task's key beside its
# name; the first stays, unchanged, for app processes of the version before.

_PG_CLAIM_FUNCTION_V3 = """
CREATE OR REPLACE FUNCTION bgtasks_claim(
    p_worker text, p_tasks text[], p_keys text[], p_slots integer,
    p_lease double precision, p_token text
) RETURNS SETOF bgtasks_runs AS $$
DECLARE
    credit integer;
BEGIN
    PERFORM pg_advisory_xact_lock(25191, hashtext(p_worker));
    SELECT p_slots - count(*) INTO credit FROM bgtasks_runs
    WHERE worker_id = p_worker AND state IN ('PENDING', 'RUNNING');
    IF credit <= 0 THEN
        RETURN;
    END IF;
    -- As in version 2, but a run is skipped by the workers whose key for
    -- its task (p_keys, beside p_tasks) is the one that rejected it.
    RETURN QUERY
    UPDATE bgtasks_runs SET
        state = 'PENDING', attempt = attempt + 1, worker_id = p_worker,
        lease_token = p_token, lease_expires_at = now() + make_interval(secs => p_lease),
        updated_at = now(), reason = NULL
    WHERE id = ANY(ARRAY(
        SELECT due.id FROM unnest(p_tasks, p_keys) AS served(name, key) CROSS JOIN LATERAL (
            SELECT id, priority, scheduled_at FROM bgtasks_runs
            WHERE state = 'SCHEDULED' AND task = served.name AND scheduled_at <= now()
                AND rejected_by IS DISTINCT FROM served.key
            ORDER BY priority DESC, scheduled_at
            LIMIT credit
            FOR UPDATE SKIP LOCKED) AS due
        ORDER BY due.priority DESC, due.scheduled_at
        LIMIT credit))
    RETURNING *;
END
$$ LANGUAGE plpgsql
"""

_REJECTED_BY = "ALTER TABLE bgtasks_runs ADD COLUMN rejected_by VARCHAR(200)"

_V3_POSTGRESQL = [_REJECTED_BY, _PG_CLAIM_FUNCTION_V3]
_V3_SQLITE = [_REJECTED_BY]

# -- version 4: leases on the app's lease clock (store/clock.py). A third
# bgtasks_claim takes the lease's deadline instead of computing it from the
# database's now(), so a step of any host's wall clock cannot move a lease.
# The others stay for app processes of the versions before (their leases
# are on the database's clock, which the lease clock is anchored at).

_PG_CLAIM_FUNCTION_V4 = """
CREATE OR REPLACE FUNCTION bgtasks_claim(
    p_worker text, p_tasks text[], p_keys text[], p_slots integer,
    p_expires timestamptz, p_token text
) RETURNS SETOF bgtasks_runs AS $$
DECLARE
    credit integer;
BEGIN
    PERFORM pg_advisory_xact_lock(25191, hashtext(p_worker));
    SELECT p_slots - count(*) INTO credit FROM bgtasks_runs
    WHERE worker_id = p_worker AND state IN ('PENDING', 'RUNNING');
    IF credit <= 0 THEN
        RETURN;
    END IF;
    -- As in version 3, with the lease's deadline given.
    RETURN QUERY
    UPDATE bgtasks_runs SET
        state = 'PENDING', attempt = attempt + 1, worker_id = p_worker,
        lease_token = p_token, lease_expires_at = p_expires,
        updated_at = now(), reason = NULL
    WHERE id = ANY(ARRAY(
        SELECT due.id FROM unnest(p_tasks, p_keys) AS served(name, key) CROSS JOIN LATERAL (
            SELECT id, priority, scheduled_at FROM bgtasks_runs
            WHERE state = 'SCHEDULED' AND task = served.name AND scheduled_at <= now()
                AND rejected_by IS DISTINCT FROM served.key
            ORDER BY priority DESC, scheduled_at
            LIMIT credit
            FOR UPDATE SKIP LOCKED) AS due
        ORDER BY due.priority DESC, due.scheduled_at
        LIMIT credit))
    RETURNING *;
END
$$ LANGUAGE plpgsql
"""

# -- version 5: due runs shared among the feeds that serve them, in a claim
# of its own name, bgtasks_claim_share. It takes how many feeds of this app
# process serve the tasks (p_feeds): when several do, one claim takes at
# most its share of what is due (counted up to credit x p_feeds), so a
# small batch is spread over the workers instead of all going to the first
# feed that wakes; a backlog larger than every feed's credit is taken
# credit by credit, as before. It returns only what a delivery needs, and
# with each row the most this claim could take (`credit`): a claim that
# took fewer left nothing due for this worker, so its freed credit alone
# need not make the feed claim again. The bgtasks_claim overloads stay for
# app processes of the versions before.

_PG_CLAIM_SHARE_FUNCTION = """
CREATE OR REPLACE FUNCTION bgtasks_claim_share(
    p_worker text, p_tasks text[], p_keys text[], p_slots integer,
    p_expires timestamptz, p_token text, p_feeds integer
) RETURNS TABLE (
    id uuid, task varchar, attempt integer, lease_token varchar, args json, kwargs json,
    timeout_seconds double precision, priority integer, scheduled_at timestamptz,
    credit integer
) AS $$
#variable_conflict use_column
DECLARE
    v_credit integer;
    v_waiting integer;
BEGIN
    PERFORM pg_advisory_xact_lock(25191, hashtext(p_worker));
    SELECT p_slots - count(*) INTO v_credit FROM bgtasks_runs AS held
    WHERE held.worker_id = p_worker AND held.state IN ('PENDING', 'RUNNING');
    IF v_credit <= 0 THEN
        RETURN;
    END IF;
    IF p_feeds > 1 THEN
        SELECT count(*) INTO v_waiting FROM unnest(p_tasks, p_keys) AS served(name, key)
        CROSS JOIN LATERAL (
            SELECT 1 FROM bgtasks_runs AS r
            WHERE r.state = 'SCHEDULED' AND r.task = served.name AND r.scheduled_at <= now()
                AND r.rejected_by IS DISTINCT FROM served.key
            LIMIT v_credit * p_feeds) AS shared;
        v_credit := least(v_credit, greatest(1, (v_waiting + p_feeds - 1) / p_feeds));
    END IF;
    -- As bgtasks_claim of version 4.
    RETURN QUERY
    UPDATE bgtasks_runs AS r SET
        state = 'PENDING', attempt = r.attempt + 1, worker_id = p_worker,
        lease_token = p_token, lease_expires_at = p_expires,
        updated_at = now(), reason = NULL
    WHERE r.id = ANY(ARRAY(
        SELECT due.id FROM unnest(p_tasks, p_keys) AS served(name, key) CROSS JOIN LATERAL (
            SELECT d.id, d.priority, d.scheduled_at FROM bgtasks_runs AS d
            WHERE d.state = 'SCHEDULED' AND d.task = served.name AND d.scheduled_at <= now()
                AND d.rejected_by IS DISTINCT FROM served.key
            ORDER BY d.priority DESC, d.scheduled_at
            LIMIT v_credit
            FOR UPDATE SKIP LOCKED) AS due
        ORDER BY due.priority DESC, due.scheduled_at
        LIMIT v_credit))
    RETURNING r.id, r.task, r.attempt, r.lease_token, r.args, r.kwargs, r.timeout_seconds,
        r.priority, r.scheduled_at, v_credit;
END
$$ LANGUAGE plpgsql
"""

# MIGRATIONS[n - 1][dialect]: the statements that take a database from
# version n - 1 to n.
MIGRATIONS: list[dict[str, list[str]]] = [
    {"postgresql": _V1_POSTGRESQL, "sqlite": _V1_SQLITE},
    {"postgresql": _V2_POSTGRESQL, "sqlite": _V2_SQLITE},
    {"postgresql": _V3_POSTGRESQL, "sqlite": _V3_SQLITE},
    {"postgresql": [_PG_CLAIM_FUNCTION_V4], "sqlite": []},
    {"postgresql": [_PG_CLAIM_SHARE_FUNCTION], "sqlite": []},
]
