-- One row per sample instant of one data type in one session. Pseudonymous: ids only, no PII.
--
-- Dedup: a frame that is retried, re-delivered or replayed writes rows with the same sorting
-- key (user_id, session_id, data_type, t_us); ReplacingMergeTree keeps one of them when parts
-- merge, and `FINAL` (or the analyst views) gives exact answers before that. The partition
-- key is derived from the sample time, never from the ingest time, so that every copy of a row
-- lands in the same partition, where ReplacingMergeTree can collapse it.
CREATE TABLE IF NOT EXISTS points
(
    user_id     UUID,
    session_id  UUID,
    data_type   String,
    t_us        Int64,
    values      Array(Float32),
    ingested_at DateTime
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(toDateTime(intDiv(t_us, 1000000)))
ORDER BY (user_id, session_id, data_type, t_us)
