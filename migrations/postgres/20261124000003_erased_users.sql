-- The erasure list: users whose data must be gone. Consumers drop their frames on consume and on
-- replay; the jobs runner deletes their rows from ClickHouse and records when. Ids only, and no
-- foreign key, so the entry outlives the user row it names.
CREATE TABLE erased_users (
    user_id               uuid PRIMARY KEY,
    erased_at             timestamptz NOT NULL DEFAULT now(),
    clickhouse_deleted_at timestamptz
);

CREATE INDEX erased_users_pending_clickhouse ON erased_users (erased_at) WHERE clickhouse_deleted_at IS NULL;
