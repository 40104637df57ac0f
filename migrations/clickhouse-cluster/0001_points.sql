-- The cluster layout of 0001_points.sql (BIOFEED_CLICKHOUSE_CLUSTER): the same columns, sort key
-- and partitions, in `points_local` on every node, replicated between the replicas of each
-- shard through ZooKeeper/ClickHouse Keeper, and a Distributed table `points` over them that
-- every service reads and writes.
--
-- Sharding key: the person (`cityHash64(toString(user_id))`). Every copy of a row — a retry, a
-- redelivery, a replay — has the same user_id and so lands on the same shard, where
-- ReplacingMergeTree collapses it and `FINAL` answers exactly. A person's sessions, trends,
-- export and erasure stay on one shard. The hash is of the UUID's text, which every
-- ClickHouse version writes alike, so an upgrade cannot move a person to another shard.
--
-- The runner fills in `{database}` and `{cluster}`; `{shard}` and `{replica}` are the nodes'
-- macros (config.xml `<macros>`).
CREATE TABLE IF NOT EXISTS {database}.points_local ON CLUSTER {cluster}
(
    user_id     UUID,
    session_id  UUID,
    data_type   String,
    t_us        Int64,
    values      Array(Float32),
    ingested_at DateTime
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/points_local', '{replica}', ingested_at)
PARTITION BY toYYYYMM(toDateTime(intDiv(t_us, 1000000)))
ORDER BY (user_id, session_id, data_type, t_us);

CREATE TABLE IF NOT EXISTS {database}.points ON CLUSTER {cluster} AS {database}.points_local
ENGINE = Distributed({cluster}, {database}, points_local, cityHash64(toString(user_id)))
