-- The cluster layout of 0005_analyst_database.sql, on every node: the analyst's Distributed
-- tables send each query to the node itself as `biofeed_analyst_source` (cluster
-- `biofeed_analyst_source` in each node's config.xml names that node), whose views and tables
-- in biofeed's database then read every shard. Only pseudonymous views and rollups are here.
CREATE DATABASE IF NOT EXISTS {analyst_database} ON CLUSTER {cluster};

CREATE TABLE IF NOT EXISTS {analyst_database}.completed_sessions ON CLUSTER {cluster} AS {database}.completed_sessions
ENGINE = Distributed(biofeed_analyst_source, {database}, completed_sessions);

CREATE TABLE IF NOT EXISTS {analyst_database}.analyst_points ON CLUSTER {cluster} AS {database}.analyst_points
ENGINE = Distributed(biofeed_analyst_source, {database}, analyst_points);

CREATE TABLE IF NOT EXISTS {analyst_database}.rollups_1s ON CLUSTER {cluster} AS {database}.rollups_1s
ENGINE = Distributed(biofeed_analyst_source, {database}, rollups_1s);

CREATE TABLE IF NOT EXISTS {analyst_database}.rollups_1m ON CLUSTER {cluster} AS {database}.rollups_1m
ENGINE = Distributed(biofeed_analyst_source, {database}, rollups_1m);

CREATE TABLE IF NOT EXISTS {analyst_database}.session_metrics ON CLUSTER {cluster} AS {database}.session_metrics
ENGINE = Distributed(biofeed_analyst_source, {database}, session_metrics)
