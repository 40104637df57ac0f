-- What analysts query: exact (deduplicated) points of completed sessions only. Points of open,
-- aborted or expired sessions never show here, even before the purge job deletes them.
CREATE VIEW IF NOT EXISTS completed_sessions AS
SELECT session_id, user_id, exercise, started_at, ended_at
FROM session_facts FINAL
WHERE status = 'completed';

CREATE VIEW IF NOT EXISTS analyst_points AS
SELECT user_id, session_id, data_type, t_us, values
FROM points FINAL
WHERE session_id IN (SELECT session_id FROM session_facts FINAL WHERE status = 'completed')
