-- Pseudonymous facts about sessions, mirrored from Postgres by the jobs runner (analyst sync):
-- no names, no locations, no feedback text. The newest `version` of a session wins, so the
-- mirror can be re-sent at will. Analysts' views use it to show completed sessions only.
CREATE TABLE IF NOT EXISTS session_facts
(
    session_id UUID,
    user_id    UUID,
    exercise   String,
    status     String,
    started_at DateTime,
    ended_at   Nullable(DateTime),
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY session_id
