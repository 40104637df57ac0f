-- Rollups and session metrics, computed by the jobs runner from `points FINAL` (so a replayed
-- or retried row never counts twice) and written again whenever a session's points change: the
-- newest `version` (µs when computed) of a key wins. Pseudonymous like `points`: ids only.
--
-- One row per session, data type, channel and bucket; `mean` is sum / count, kept for
-- convenience. Buckets start at multiples of the resolution (µs since the epoch).
CREATE TABLE IF NOT EXISTS rollups_1s
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
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(toDateTime(intDiv(bucket_us, 1000000)))
ORDER BY (user_id, session_id, data_type, channel, bucket_us);

CREATE TABLE IF NOT EXISTS rollups_1m
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
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(toDateTime(intDiv(bucket_us, 1000000)))
ORDER BY (user_id, session_id, data_type, channel, bucket_us);

-- Per-session metrics of completed sessions: HRV (mean_rr_ms, sdnn_ms, rmssd_ms, pnn50_pct,
-- mean_hr_bpm), pulse oximetry (spo2_mean_pct, spo2_min_pct, spo2_below_90_s) and EEG band
-- power (eeg_delta_uv2, eeg_theta_uv2, eeg_alpha_uv2, eeg_beta_uv2 per channel). `channel` is
-- 0 for single-stream metrics. A metric that cannot be computed (too few samples) has no row.
CREATE TABLE IF NOT EXISTS session_metrics
(
    user_id    UUID,
    session_id UUID,
    metric     String,
    channel    UInt16,
    value      Float64,
    samples    UInt64,
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (user_id, session_id, metric, channel);
