"""The store's hand-written statements, each named, its text written out
once per dialect. They are the hot paths whose shape SQLAlchemy's builder
cannot say in one round trip (a map's insert from one JSON parameter, a
batch of reports as one UPDATE … FROM). The states a statement may move a
run out of are a parameter, read from states.py by the caller.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

__all__ = ["INSERT_MANY", "REPORT_COMPLETED", "REPORT_RUNNING", "Statements"]

Statements = dict[str, TextualSelect]

_INSERT_MANY = {
    "postgresql": """
        INSERT INTO bgtasks_runs (id, task, state, attempt, max_attempts, rescues, max_rescues,
            retry_delays, timeout_seconds, priority, args, kwargs, created_at, scheduled_at,
            updated_at, cancel_requested)
        SELECT CAST(e->>0 AS uuid), CAST(:task AS text), 'SCHEDULED', 0,
               CAST(:max_attempts AS integer), 0, CAST(:max_rescues AS integer),
               CAST(:retry_delays AS json), CAST(:timeout AS double precision), 0,
               e->1, e->2, now(), now(), now(), false
        FROM json_array_elements(CAST(:batch AS json)) AS e
        RETURNING id, created_at, scheduled_at
    """,
    "sqlite": """
        INSERT INTO bgtasks_runs (id, task, state, attempt, max_attempts, rescues, max_rescues,
            retry_delays, timeout_seconds, priority, args, kwargs, created_at, scheduled_at,
            updated_at, cancel_requested)
        SELECT json_extract(value, '$[0]'), :task, 'SCHEDULED', 0, :max_attempts, 0,
               :max_rescues, :retry_delays, :timeout, 0, json_extract(value, '$[1]'),
               json_extract(value, '$[2]'), :now, :now, :now, 0
        FROM json_each(:batch)
        RETURNING id, created_at, scheduled_at
    """,
}

# A batch of RUNNING reports. PostgreSQL locks the rows in id order first,
# as heartbeats do, so the two never deadlock.
_REPORT_RUNNING = {
    "postgresql": """
        UPDATE bgtasks_runs AS r SET state = 'RUNNING', started_at = now(), updated_at = now()
        FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[])) AS v(id, token)
        WHERE r.id = v.id AND r.lease_token = v.token
          AND r.state = ANY(CAST(:sources AS text[]))
          AND r.id IN (SELECT id FROM bgtasks_runs WHERE id = ANY(CAST(:ids AS uuid[]))
                       ORDER BY id FOR UPDATE)
        RETURNING r.id
    """,
    "sqlite": """
        UPDATE bgtasks_runs AS r SET state = 'RUNNING', started_at = :now, updated_at = :now
        FROM (SELECT json_extract(value, '$[0]') AS id,
                     json_extract(value, '$[1]') AS token
              FROM json_each(:batch)) AS v
        WHERE r.id = v.id AND r.lease_token = v.token
          AND r.state IN (SELECT value FROM json_each(:sources))
        RETURNING id
    """,
}

# A batch of COMPLETED reports whose results fit (each result already JSON text).
_REPORT_COMPLETED = {
    "postgresql": """
        UPDATE bgtasks_runs AS r SET state = 'COMPLETED', result = CAST(v.result AS json),
            error = NULL, started_at = coalesce(r.started_at, now()), finished_at = now(),
            lease_expires_at = NULL, updated_at = now(), reason = NULL
        FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS text[]),
                    CAST(:results AS text[])) AS v(id, token, result)
        WHERE r.id = v.id AND r.lease_token = v.token
          AND r.state = ANY(CAST(:sources AS text[]))
          AND r.id IN (SELECT id FROM bgtasks_runs WHERE id = ANY(CAST(:ids AS uuid[]))
                       ORDER BY id FOR UPDATE)
        RETURNING r.id
    """,
    "sqlite": """
        UPDATE bgtasks_runs AS r SET state = 'COMPLETED', result = v.result, error = NULL,
            started_at = coalesce(r.started_at, :now), finished_at = :now,
            lease_expires_at = NULL, updated_at = :now, reason = NULL
        FROM (SELECT json_extract(value, '$[0]') AS id,
                     json_extract(value, '$[1]') AS token,
                     json_extract(value, '$[2]') AS result
              FROM json_each(:batch)) AS v
        WHERE r.id = v.id AND r.lease_token = v.token
          AND r.state IN (SELECT value FROM json_each(:sources))
        RETURNING id
    """,
}


def _prepared(text: str, dialect: str, *returned: sa.ColumnClause[object]) -> TextualSelect:
    clause: TextClause = sa.text(text)
    if dialect == "sqlite" and ":now" in text:
        clause = clause.bindparams(sa.bindparam("now", type_=sa.DateTime(timezone=True)))
    return clause.columns(*returned)


def _build(texts: dict[str, str], *returned: sa.ColumnClause[object]) -> Statements:
    return {dialect: _prepared(text, dialect, *returned) for dialect, text in texts.items()}


_ID = sa.column("id", sa.Uuid)

# Built once at import: a call only binds parameters.
INSERT_MANY = _build(
    _INSERT_MANY,
    _ID,
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("scheduled_at", sa.DateTime(timezone=True)),
)
REPORT_RUNNING = _build(_REPORT_RUNNING, _ID)
REPORT_COMPLETED = _build(_REPORT_COMPLETED, _ID)
