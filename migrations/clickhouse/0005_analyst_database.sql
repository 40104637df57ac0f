-- The analyst's own database, for ClickHouse 18.16, which has no SQL grants: the
-- `biofeed_analyst` user may use this database only (users.xml `allow_databases`), and on 18.16
-- a view is checked against the reading user's databases, so a plain view here over biofeed's
-- tables would be refused. These Distributed tables instead send each query, over the native
-- port, to the server itself as the user `biofeed_analyst_source` (cluster
-- `biofeed_analyst_source` in config.xml), who reads biofeed's pseudonymous views and rollups.
-- Only those are here: never `points` or `session_facts`.
--
-- The runner fills in `{database}` (biofeed's database) and `{analyst_database}` before it runs
-- a statement; the checksum is taken over the file as written. It applies this file only when
-- the server knows the cluster (`system.clusters`); without one (e.g. ClickHouse Cloud) the
-- analyst is given SQL grants instead: docs/operations.md, "Least-privilege users".
--
-- `currentDatabase()` in the engine's arguments is not an option: 18.16 keeps the call
-- unevaluated in the table's metadata.
CREATE DATABASE IF NOT EXISTS {analyst_database};

CREATE TABLE IF NOT EXISTS {analyst_database}.completed_sessions AS {database}.completed_sessions
ENGINE = Distributed(biofeed_analyst_source, {database}, completed_sessions);

CREATE TABLE IF NOT EXISTS {analyst_database}.analyst_points AS {database}.analyst_points
ENGINE = Distributed(biofeed_analyst_source, {database}, analyst_points);

CREATE TABLE IF NOT EXISTS {analyst_database}.rollups_1s AS {database}.rollups_1s
ENGINE = Distributed(biofeed_analyst_source, {database}, rollups_1s);

CREATE TABLE IF NOT EXISTS {analyst_database}.rollups_1m AS {database}.rollups_1m
ENGINE = Distributed(biofeed_analyst_source, {database}, rollups_1m);

CREATE TABLE IF NOT EXISTS {analyst_database}.session_metrics AS {database}.session_metrics
ENGINE = Distributed(biofeed_analyst_source, {database}, session_metrics)
