-- One live account per email (issue 13). Before this, signing up again with an email that had a
-- live account created a second one, and a login verified the password against each of them.
-- Erased users keep no blind index (and have deleted_at set), so an erased account never holds
-- its email: the index covers live users only.
--
-- Duplicates already stored are not resolved here (which account is the person's own is not a
-- migration's call): the migration refuses, names the way out, and applies nothing.
DO $$
DECLARE
    shared_emails bigint;
BEGIN
    SELECT count(*) INTO shared_emails FROM (
        SELECT email_blind_index FROM users
        WHERE deleted_at IS NULL
        GROUP BY email_blind_index
        HAVING count(*) > 1
    ) AS shared;
    IF shared_emails > 0 THEN
        RAISE EXCEPTION '% emails have more than one live account; one live account per email is required: find them with `biofeed admin user list --show-pii`, erase the extra accounts with `biofeed admin user erase <id> --yes`, then migrate again', shared_emails;
    END IF;
END
$$;

DROP INDEX users_email_blind_index;
CREATE UNIQUE INDEX users_one_live_account_per_email ON users (email_blind_index) WHERE deleted_at IS NULL;

COMMENT ON COLUMN users.email_blind_index IS
    'Keyed blind index (HMAC of the normalised email): finds a user by email without storing it in clear. Unique among live users (one live account per email); erased users keep none.';
