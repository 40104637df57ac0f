-- The seed model of biofeed's Postgres side: people, who may see what, devices, sessions,
-- data types, failed jobs and the audit log. PII is stored only as AES-256-GCM ciphertext
-- (`*_ct` columns), encrypted with the user's own data key (`user_data_keys`), so that
-- destroying that key erases the person (crypto-shredding).

-- Roles and what they may do ---------------------------------------------------------------

CREATE TABLE roles (
    id          smallint PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z_]*$'),
    description text NOT NULL
);

CREATE TABLE permissions (
    id          smallint PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z_.]*$'),
    description text NOT NULL
);

CREATE TABLE role_permissions (
    role_id       smallint NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    permission_id smallint NOT NULL REFERENCES permissions (id) ON DELETE CASCADE,
    PRIMARY KEY (role_id, permission_id)
);

-- People ----------------------------------------------------------------------------------

CREATE TABLE users (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    role_id            smallint NOT NULL REFERENCES roles (id),
    -- Keyed blind index (HMAC of the normalised email under its own key): finds a user by email
    -- without storing the email in clear. Not unique: equal emails must not be linkable by
    -- anything but this index, and erased users keep no index at all.
    email_blind_index  bytea,
    email_ct           bytea,
    first_name_ct      bytea,
    last_name_ct       bytea,
    birth_date_ct      bytea,
    location_ct        bytea,
    gender_ct          bytea,
    demographics_ct    bytea,
    password_hash      text,
    terms_version      text,
    terms_accepted_at  timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_login_at      timestamptz,
    deleted_at         timestamptz,
    -- A live user has credentials; an erased one has no PII left at all.
    CONSTRAINT users_live_have_credentials CHECK (
        deleted_at IS NOT NULL OR (email_blind_index IS NOT NULL AND email_ct IS NOT NULL)
    ),
    CONSTRAINT users_erased_hold_no_pii CHECK (
        deleted_at IS NULL OR (
            email_blind_index IS NULL AND email_ct IS NULL AND first_name_ct IS NULL
            AND last_name_ct IS NULL AND birth_date_ct IS NULL AND location_ct IS NULL
            AND gender_ct IS NULL AND demographics_ct IS NULL AND password_hash IS NULL
        )
    ),
    CONSTRAINT users_terms_come_together CHECK ((terms_version IS NULL) = (terms_accepted_at IS NULL))
);

CREATE INDEX users_email_blind_index ON users (email_blind_index) WHERE deleted_at IS NULL;
CREATE INDEX users_role ON users (role_id) WHERE deleted_at IS NULL;

-- One data key per user, wrapped (encrypted) by the master key of `master_key_version`.
-- Deleting the row makes every `*_ct` value of the user unreadable for good.
CREATE TABLE user_data_keys (
    user_id            uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    wrapped_key        bytea NOT NULL,
    master_key_version integer NOT NULL CHECK (master_key_version > 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    rotated_at         timestamptz
);

CREATE INDEX user_data_keys_master_version ON user_data_keys (master_key_version);

-- Relationships: a lead (parent, practitioner, …) and a follower (child, patient, …).
CREATE TABLE groups (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    lead_id           uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    follower_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    relationship_type text NOT NULL CHECK (
        relationship_type IN ('parent_child', 'guardian_ward', 'practitioner_patient', 'coach_athlete')
    ),
    invited_by        uuid REFERENCES users (id) ON DELETE SET NULL,
    invited_at        timestamptz NOT NULL DEFAULT now(),
    -- Who consented (the follower, or for a minor the guardian) and when.
    consented_by      uuid REFERENCES users (id) ON DELETE SET NULL,
    consented_at      timestamptz,
    revoked_by        uuid REFERENCES users (id) ON DELETE SET NULL,
    revoked_at        timestamptz,
    CONSTRAINT groups_not_self CHECK (lead_id <> follower_id),
    -- consented_by may later become NULL (that person erased); the time of consent stays.
    CONSTRAINT groups_consent_has_time CHECK (consented_by IS NULL OR consented_at IS NOT NULL),
    CONSTRAINT groups_revoked_after_invite CHECK (revoked_at IS NULL OR revoked_at >= invited_at)
);

-- At most one live relationship of a kind between two people.
CREATE UNIQUE INDEX groups_one_live_per_pair
    ON groups (lead_id, follower_id, relationship_type) WHERE revoked_at IS NULL;
CREATE INDEX groups_by_follower ON groups (follower_id) WHERE revoked_at IS NULL;

-- What is measured ------------------------------------------------------------------------

CREATE TABLE data_types (
    id             smallint PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    description    text NOT NULL,
    unit           text NOT NULL,
    channels       smallint NOT NULL CHECK (channels BETWEEN 1 AND 256),
    -- Nominal samples per second; NULL for event streams such as RR intervals.
    sample_rate_hz real CHECK (sample_rate_hz IS NULL OR (sample_rate_hz > 0 AND sample_rate_hz <= 100000)),
    min_value      real NOT NULL,
    max_value      real NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT data_types_range CHECK (min_value < max_value)
);

CREATE TABLE exercises (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE exercise_data_types (
    exercise_id  integer NOT NULL REFERENCES exercises (id) ON DELETE CASCADE,
    data_type_id smallint NOT NULL REFERENCES data_types (id),
    PRIMARY KEY (exercise_id, data_type_id)
);

-- Devices and sessions --------------------------------------------------------------------

CREATE TABLE devices (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the 256-bit bearer token; the token itself is shown once and never stored.
    token_hash   bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    model        text NOT NULL DEFAULT '' CHECK (length(model) <= 200),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz,
    revoked_at   timestamptz
);

CREATE INDEX devices_by_user ON devices (user_id);

CREATE TABLE sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id   uuid REFERENCES devices (id) ON DELETE SET NULL,
    exercise_id integer NOT NULL REFERENCES exercises (id),
    -- Where the session happened is PII: ciphertext under the user's data key.
    location_ct bytea,
    -- The user's own words after the session ("how are you feeling"), as answered.
    feedback    jsonb,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'completed', 'aborted', 'expired', 'purged')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    -- An open session not completed by then is expired and its points purged.
    deadline_at timestamptz NOT NULL,
    ended_at    timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_end_after_start CHECK (ended_at IS NULL OR ended_at >= started_at),
    CONSTRAINT sessions_deadline_after_start CHECK (deadline_at > started_at),
    CONSTRAINT sessions_closed_have_end CHECK ((status = 'open') = (ended_at IS NULL))
);

CREATE INDEX sessions_by_user ON sessions (user_id, started_at DESC);
CREATE INDEX sessions_open_by_deadline ON sessions (deadline_at) WHERE status = 'open';
CREATE INDEX sessions_by_status ON sessions (status, updated_at);

-- The data types a session declared it will stream.
CREATE TABLE session_data_types (
    session_id   uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    data_type_id smallint NOT NULL REFERENCES data_types (id),
    PRIMARY KEY (session_id, data_type_id)
);

-- Jobs and audit --------------------------------------------------------------------------

CREATE TABLE failed_jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text NOT NULL,
    -- Which backend connection the job used when it failed (e.g. clickhouse, postgres).
    connection  text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}'::jsonb,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 1 CHECK (attempts >= 1),
    retried_at  timestamptz,
    resolved_at timestamptz
);

CREATE INDEX failed_jobs_unresolved ON failed_jobs (failed_at) WHERE resolved_at IS NULL;
CREATE INDEX failed_jobs_by_job ON failed_jobs (job, failed_at DESC);

-- Who read or changed whose data. Ids only: no PII in the log. No foreign keys, so that the
-- record of access outlives the erasure of either party.
CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor_id   uuid,
    subject_id uuid,
    action     text NOT NULL,
    resource   text NOT NULL,
    allowed    boolean NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX audit_log_by_subject ON audit_log (subject_id, at DESC);
CREATE INDEX audit_log_by_actor ON audit_log (actor_id, at DESC);
