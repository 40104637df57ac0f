-- The cluster layout of 0004_rollups_and_metrics.sql: each table as `<name>_local` on every node
-- (replicated within its shard) and a Distributed `<name>` over them, sharded by the person
-- like `points`, so that a session's rollups and metrics sit on the shard of its points.
CREATE TABLE IF NOT EXISTS {database}.rollups_1s_local ON CLUSTER {cluster}
(
    user_id    UUID,
    session_id UUID,
    data_type  String,
    channel    UInt16,
    bucket_us  Int64,
    count      UInt64,
    min        Float32,
    max        Float32,
    sum        Float64,
    mean       Float64,
    version    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/rollups_1s_local', '{replica}', version)
PARTITION BY toYYYYMM(toDateTime(intDiv(bucket_us, 1000000)))
ORDER BY (user_id, session_id, data_type, channel, bucket_us);

CREATE TABLE IF NOT EXISTS {database}.rollups_1s ON CLUSTER {cluster} AS {database}.rollups_1s_local
ENGINE = Distributed({cluster}, {database}, rollups_1s_local, cityHash64(toString(user_id)));

CREATE TABLE IF NOT EXISTS {database}.rollups_1m_local ON CLUSTER {cluster}
(
    user_id    UUID,
    session_id UUID,
    data_type  String,
    channel    UInt16,
    bucket_us  Int64,
    count      UInt64,
    min        Float32,
    max        Float32,
    sum        Float64,
    mean       Float64,
    version    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/rollups_1m_local', '{replica}', version)
PARTITION BY toYYYYMM(toDateTime(intDiv(bucket_us, 1000000)))
ORDER BY (user_id, session_id, data_type, channel, bucket_us);

CREATE TABLE IF NOT EXISTS {database}.rollups_1m ON CLUSTER {cluster} AS {database}.rollups_1m_local
ENGINE = Distributed({cluster}, {database}, rollups_1m_local, cityHash64(toString(user_id)));

CREATE TABLE IF NOT EXISTS {database}.session_metrics_local ON CLUSTER {cluster}
(
    user_id    UUID,
    session_id UUID,
    metric     String,
    channel    UInt16,
    value      Float64,
    samples    UInt64,
    version    UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/session_metrics_local', '{replica}', version)
ORDER BY (user_id, session_id, metric, channel);

CREATE TABLE IF NOT EXISTS {database}.session_metrics ON CLUSTER {cluster} AS {database}.session_metrics_local
ENGINE = Distributed({cluster}, {database}, session_metrics_local, cityHash64(toString(user_id)))
