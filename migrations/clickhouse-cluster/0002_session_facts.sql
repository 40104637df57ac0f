-- The cluster layout of 0002_session_facts.sql: one table replicated to every node of the
-- cluster (one ZooKeeper path for all of them, no Distributed table). It is small (a row per
-- session), and each shard's part of the analysts' views filters its own points by it locally.
CREATE TABLE IF NOT EXISTS {database}.session_facts ON CLUSTER {cluster}
(
    session_id UUID,
    user_id    UUID,
    exercise   String,
    status     String,
    started_at DateTime,
    ended_at   Nullable(DateTime),
    version    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{database}/session_facts', '{replica}', version)
ORDER BY session_id
