-- Accounts and access: the country a user's consent age depends on (PII, so ciphertext like the
-- rest), people's login tokens, and the counters that rate-limit failed logins.

ALTER TABLE users ADD COLUMN country_ct bytea;

ALTER TABLE users DROP CONSTRAINT users_erased_hold_no_pii;
ALTER TABLE users ADD CONSTRAINT users_erased_hold_no_pii CHECK (
    deleted_at IS NULL OR (
        email_blind_index IS NULL AND email_ct IS NULL AND first_name_ct IS NULL
        AND last_name_ct IS NULL AND birth_date_ct IS NULL AND location_ct IS NULL
        AND gender_ct IS NULL AND demographics_ct IS NULL AND password_hash IS NULL
        AND country_ct IS NULL
    )
);

-- A person's bearer tokens from `POST /v1/auth/login`: 256 random bits shown once, stored only as
-- their SHA-256, expiring, revoked by logout or erasure.
CREATE TABLE login_tokens (
    token_hash   bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    CONSTRAINT login_tokens_expire_after_creation CHECK (expires_at > created_at)
);

CREATE INDEX login_tokens_by_user ON login_tokens (user_id) WHERE revoked_at IS NULL;

-- Failed logins counted per account and per client address, in fixed windows. Keys are keyed
-- hashes (the email's blind index; an HMAC of the address), never an email or an IP in clear.
CREATE TABLE login_throttle (
    scope           text NOT NULL CHECK (scope IN ('account', 'address')),
    key             bytea NOT NULL,
    window_started  timestamptz NOT NULL,
    failures        integer NOT NULL CHECK (failures >= 0),
    PRIMARY KEY (scope, key)
);
