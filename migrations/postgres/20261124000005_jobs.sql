-- The jobs runner's bookkeeping: one schedule row per job (its next run, the lease of the runner
-- running it, its progress watermark), one row per run of a job instance (unique, so two runners
-- can never both record the same instance), what was computed for which session, and why a
-- session's points were purged.

CREATE TABLE job_schedule (
    job                  text PRIMARY KEY CHECK (job ~ '^[a-z][a-z_]*$'),
    next_run_at          timestamptz NOT NULL DEFAULT now(),
    leased_by            text,
    lease_until          timestamptz,
    -- Progress that survives restarts, e.g. {"ingested_after": 1764000000}.
    watermark            jsonb NOT NULL DEFAULT '{}'::jsonb,
    consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    CONSTRAINT job_schedule_lease_whole CHECK ((leased_by IS NULL) = (lease_until IS NULL))
);

CREATE TABLE job_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text NOT NULL,
    -- The instance: the scheduled time it was claimed for (or the retry's own time).
    instance_at timestamptz NOT NULL,
    runner      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('ok', 'failed')),
    items       bigint,
    CONSTRAINT job_runs_one_per_instance UNIQUE (job, instance_at)
);

CREATE INDEX job_runs_recent ON job_runs (job, started_at DESC);

-- When rollups and metrics were last computed for a session, and the fingerprint of its rows in
-- ClickHouse then (distinct sample instants and newest ingest second): a different fingerprint
-- later means rows arrived (a late frame, a replay), and the computation is made again.
CREATE TABLE session_computations (
    session_id          uuid PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
    rollups_at          timestamptz,
    rollups_fingerprint text,
    metrics_at          timestamptz,
    metrics_fingerprint text
);

ALTER TABLE sessions ADD COLUMN purged_at timestamptz;
ALTER TABLE sessions ADD COLUMN purge_reason text CHECK (purge_reason IN ('aborted', 'expired'));
ALTER TABLE sessions ADD CONSTRAINT sessions_purged_have_reason
    CHECK ((status = 'purged') = (purged_at IS NOT NULL AND purge_reason IS NOT NULL));

ALTER TABLE failed_jobs ADD COLUMN next_attempt_at timestamptz;
CREATE INDEX failed_jobs_due ON failed_jobs (next_attempt_at) WHERE resolved_at IS NULL;
