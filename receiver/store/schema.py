"""The schema and its migrations, one list for both backends.

Each migration is SQL with placeholders that differ by dialect: `{real}` (epoch seconds),
`{blob}` (raw bytes), `{serial}` (auto-increment key), `{without_rowid}` (small keyed
tables). Times are epoch seconds everywhere, so comparisons are the same arithmetic in
SQLite and PostgreSQL. Append, never edit: `schema_version` records what has been applied.
"""

from __future__ import annotations

DIALECTS = {
    "sqlite": {
        "real": "REAL",
        "blob": "BLOB",
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "without_rowid": " WITHOUT ROWID",
        # A job's top-level string metadata values, for the backfill of job_metadata.
        "metadata_strings": "json_each(j.request, '$.metadata') m WHERE m.type = 'text'",
        "metadata_value": "m.value",
    },
    "postgres": {
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
        "serial": "BIGSERIAL PRIMARY KEY",
        "without_rowid": "",
        "metadata_strings": "jsonb_each(CASE WHEN jsonb_typeof(j.request::jsonb -> 'metadata')"
        " = 'object' THEN j.request::jsonb -> 'metadata' END) m"
        " WHERE jsonb_typeof(m.value) = 'string'",
        "metadata_value": "m.value #>> '{}'",
    },
}

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {real} NOT NULL
)
"""

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "jobs, predictions, events, outbox",
        [
            """
            CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                token_hash TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                domain TEXT NOT NULL,
                status TEXT NOT NULL,
                status_rank INTEGER NOT NULL,
                prediction_id TEXT,
                request TEXT NOT NULL,
                error TEXT,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL,
                completed_at {real},
                next_poll_at {real},
                poll_attempts INTEGER NOT NULL DEFAULT 0
            )
            """,
            "CREATE INDEX jobs_status ON jobs (status, id)",
            "CREATE INDEX jobs_domain ON jobs (domain, id)",
            "CREATE INDEX jobs_next_poll ON jobs (next_poll_at) WHERE next_poll_at IS NOT NULL",
            # One row per prediction id: the API may create two predictions for one submission.
            """
            CREATE TABLE predictions (
                id TEXT PRIMARY KEY,
                job_id TEXT NOT NULL,
                status TEXT NOT NULL,
                status_rank INTEGER NOT NULL,
                updated_at {real} NOT NULL
            ){without_rowid}
            """,
            # Deduplication rests on this unique key, not on check-then-insert.
            """
            CREATE TABLE events (
                id TEXT PRIMARY KEY,
                job_id TEXT NOT NULL,
                prediction_id TEXT NOT NULL,
                status TEXT NOT NULL,
                domain TEXT NOT NULL,
                source TEXT NOT NULL,
                verification TEXT NOT NULL,
                received_at {real} NOT NULL,
                body {blob},
                UNIQUE (prediction_id, status)
            )
            """,
            "CREATE INDEX events_job ON events (job_id)",
            # No index on received_at: only `prune` asks by age, rarely, and every callback
            # would pay for the index.
            """
            CREATE TABLE deliveries (
                id {serial},
                event_id TEXT NOT NULL,
                sink TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at {real} NOT NULL,
                lease_until {real},
                last_error TEXT,
                created_at {real} NOT NULL,
                updated_at {real} NOT NULL,
                delivered_at {real},
                UNIQUE (event_id, sink)
            )
            """,
            "CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at)",
            "CREATE INDEX deliveries_sink ON deliveries (sink, state)",
            """
            CREATE TABLE attempts (
                id {serial},
                delivery_id INTEGER NOT NULL,
                attempt INTEGER NOT NULL,
                started_at {real} NOT NULL,
                duration_ms {real} NOT NULL,
                status_code INTEGER,
                error TEXT,
                snippet TEXT
            )
            """,
            "CREATE INDEX attempts_delivery ON attempts (delivery_id)",
        ],
    ),
    (
        2,
        "deliveries: an integer lease token",
        # Counted up by every claim: finishing checks it, not the lease's end time (a float
        # that went through JSON and had to be compared within a microsecond).
        ["ALTER TABLE deliveries ADD COLUMN lease INTEGER NOT NULL DEFAULT 0"],
    ),
    (
        3,
        "lists: jobs and deliveries newest first by (created_at, id), job metadata values",
        # The dashboard's and /v1's lists go newest first by (created_at, id), so that a time
        # range, a status or a state and the page's cursor are one range of one index, read in
        # order: no sort, whatever the filters match.
        [
            "DROP INDEX jobs_status",
            "DROP INDEX jobs_domain",
            "CREATE INDEX jobs_created ON jobs (created_at, id)",
            "CREATE INDEX jobs_status_created ON jobs (status, created_at, id)",
            "CREATE INDEX jobs_domain_created ON jobs (domain, created_at, id)",
            # A job found by one of its metadata values (a session id, a customer reference):
            # each top-level string value of the submitted metadata, written with the job.
            """
            CREATE TABLE job_metadata (
                value TEXT NOT NULL,
                created_at {real} NOT NULL,
                job_id TEXT NOT NULL,
                PRIMARY KEY (value, created_at, job_id)
            ){without_rowid}
            """,
            "INSERT INTO job_metadata (value, created_at, job_id)"
            " SELECT DISTINCT {metadata_value}, j.created_at, j.id FROM jobs j, {metadata_strings}",
            # Deliveries newest first: by state (the `(state, id)` index of the lists, in their
            # order), by sink, or all. deliveries_sink (sink, state) stays: the overview counts
            # each sink's rows by state, and finds its oldest waiting row, from it alone.
            "CREATE INDEX deliveries_state_created ON deliveries (state, created_at, id)",
            "CREATE INDEX deliveries_sink_created ON deliveries (sink, created_at, id)",
            "CREATE INDEX deliveries_created ON deliveries (created_at, id)",
        ],
    ),
]


def render(sql: str, dialect: str) -> str:
    return sql.format(**DIALECTS[dialect])


def latest_version() -> int:
    return MIGRATIONS[-1][0]
