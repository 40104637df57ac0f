-- Least privilege. `biofeed migrate` runs as the owner of the schema; the services (gateway,
-- consumers, jobs, admin commands) run as a login role that is a member of `biofeed_service`,
-- which may read and write the data but never change the schema. The audit log is
-- append-only for them: they may insert and read its rows, never update or delete them.
--
-- The group role is made here when it is missing (the owner then needs CREATEROLE); an operator
-- who made it beforehand needs no such right. Roles are per server, grants per database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'biofeed_service') THEN
        BEGIN
            CREATE ROLE biofeed_service NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- another database's migration made it at the same moment
        END;
    END IF;
END
$$;

-- Nobody but the owner creates objects in the schema (PostgreSQL 15 already says so; older
-- servers let everyone).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO biofeed_service;
-- A role that does not own the schema only gets a warning from that REVOKE: refuse, rather than
-- leave the services able to change the schema.
DO $$
BEGIN
    IF has_schema_privilege('biofeed_service', 'public', 'CREATE') THEN
        RAISE EXCEPTION 'biofeed_service may create objects in schema public: as the schema''s owner, run REVOKE CREATE ON SCHEMA public FROM PUBLIC, then migrate again';
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO biofeed_service;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO biofeed_service;

-- Append-only: the record of who read or changed whose data cannot be rewritten by the
-- services it records.
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM biofeed_service;

-- The migrations' bookkeeping is the owner's.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON _sqlx_migrations FROM biofeed_service;

-- Tables and sequences later migrations create get the same grants; a later migration that
-- adds an append-only table revokes as above.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO biofeed_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO biofeed_service;
