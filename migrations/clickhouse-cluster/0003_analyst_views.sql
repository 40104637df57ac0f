-- The cluster layout of 0003_analyst_views.sql, on every node. `points` is the Distributed
-- table: each shard runs the query on its own `points_local FINAL` (exact, since every copy of
-- a row is on one shard) with its own full copy of `session_facts` for the IN filter.
CREATE VIEW IF NOT EXISTS {database}.completed_sessions ON CLUSTER {cluster} AS
SELECT session_id, user_id, exercise, started_at, ended_at
FROM {database}.session_facts FINAL
WHERE status = 'completed';

CREATE VIEW IF NOT EXISTS {database}.analyst_points ON CLUSTER {cluster} AS
SELECT user_id, session_id, data_type, t_us, values
FROM {database}.points FINAL
WHERE session_id IN (SELECT session_id FROM {database}.session_facts FINAL WHERE status = 'completed')
