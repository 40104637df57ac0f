//! Logging in: email and password → an opaque bearer token (256 random bits, stored only as its
//! SHA-256, expiring), logging out, and the throttle on failed attempts — per account and per
//! client address, in fixed windows, kept in Postgres so every gateway shares it.

use std::net::IpAddr;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::passwords::{Passwords, Verified};
use crate::policy::{actor_query, Actor};
use crate::{Accounts, AccountsError};

/// Every login token starts with this, so leaked tokens are easy to recognise.
pub const TOKEN_PREFIX: &str = "bfu_";

/// Login settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginSettings {
    /// How long a login token is valid.
    #[arg(long = "login-token-ttl", id = "login_token_ttl", value_name = "DURATION",
          env = "BIOFEED_LOGIN_TOKEN_TTL", default_value = "12h",
          value_parser = biofeed_backends::parse_duration)]
    pub token_ttl: Duration,

    /// Failed logins allowed per account within one throttle window; more get 429.
    #[arg(long = "login-max-failures", id = "login_max_failures", value_name = "N",
          env = "BIOFEED_LOGIN_MAX_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_failures_per_account: u32,

    /// Failed logins allowed per client address within one throttle window; more get 429.
    #[arg(long = "login-max-failures-per-address", id = "login_max_failures_per_address",
          value_name = "N", env = "BIOFEED_LOGIN_MAX_FAILURES_PER_ADDRESS", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_failures_per_address: u32,

    /// The throttle window: failures older than this are forgotten.
    #[arg(long = "login-throttle-window", id = "login_throttle_window", value_name = "DURATION",
          env = "BIOFEED_LOGIN_THROTTLE_WINDOW", default_value = "15m",
          value_parser = biofeed_backends::parse_duration)]
    pub throttle_window: Duration,
}

impl Default for LoginSettings {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(12 * 3600),
            max_failures_per_account: 5,
            max_failures_per_address: 50,
            throttle_window: Duration::from_secs(900),
        }
    }
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Wrong email or password (the answer does not say which).
    #[error("the email or the password is wrong")]
    BadCredentials,
    /// Too many failures for this account or address; retry after the hint.
    #[error("too many failed logins; retry in {retry_after_secs} s")]
    Throttled {
        /// Seconds until the window ends.
        retry_after_secs: u64,
    },
    /// Something else failed.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
}

impl From<sqlx::Error> for LoginError {
    fn from(e: sqlx::Error) -> Self {
        LoginError::Accounts(e.into())
    }
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    /// Who.
    pub user_id: Uuid,
    /// The bearer token: shown once, stored only hashed.
    pub token: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// Checks email and password and issues a token. An unknown email costs the same argon2 work as
/// a wrong password, and counts against the same throttle. There is at most one live account per
/// email, so a login costs exactly one password verification.
pub async fn login(
    accounts: &Accounts,
    passwords: &Passwords,
    settings: &LoginSettings,
    email: &str,
    password: &str,
    address: Option<IpAddr>,
) -> Result<LoggedIn, LoginError> {
    let pool = &accounts.pool;
    let throttle = Throttle::new(
        accounts,
        settings,
        accounts.keys.email_blind_index(email),
        address,
    );
    throttle.refuse_if_exceeded(pool).await?;

    let account: Option<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT id, password_hash FROM users WHERE email_blind_index = $1 AND deleted_at IS NULL",
    )
    .bind(&throttle.account_key)
    .fetch_optional(pool)
    .await?;
    let (user_id, hash) = match account {
        Some((id, hash)) => (Some(id), hash),
        None => (None, None),
    };
    // An unknown email is verified against the decoy hash: the same work as a wrong password.
    let verified = verify(passwords, password, hash).await?;
    let (Some(user_id), Verified::Yes | Verified::YesRehash) = (user_id, verified) else {
        throttle.count_failure(pool).await?;
        tracing::info!("login refused: bad credentials");
        return Err(LoginError::BadCredentials);
    };
    throttle.clear_account(pool).await?;

    if verified == Verified::YesRehash {
        let new_hash = passwords.hash_off_thread(password.to_owned()).await?;
        sqlx::query("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1")
            .bind(user_id)
            .bind(new_hash)
            .execute(pool)
            .await?;
        tracing::info!(user_id = %user_id, "password rehashed with the current parameters");
    }
    let (token, hash) = new_token();
    let expires_at: DateTime<Utc> = sqlx::query_scalar(
        "WITH touched AS (UPDATE users SET last_login_at = now() WHERE id = $1)
         INSERT INTO login_tokens (token_hash, user_id, expires_at)
         VALUES ($2, $1, now() + make_interval(secs => $3)) RETURNING expires_at",
    )
    .bind(user_id)
    .bind(&hash[..])
    .bind(settings.token_ttl.as_secs_f64())
    .fetch_one(pool)
    .await?;
    tracing::info!(user_id = %user_id, "logged in");
    Ok(LoggedIn {
        user_id,
        token,
        expires_at,
    })
}

/// Checks a logged-in user's current password again (before a password change or erasure),
/// under the same failed-login throttle as [`login`]: per account (the email's blind index, so
/// these checks and logins share one count) and per client address. Once either is exceeded the
/// answer is [`LoginError::Throttled`] before any verification, even for the right password; a
/// wrong password is [`LoginError::BadCredentials`] and counts; a right one clears the account's
/// count, as a login does. An erased or unknown user is [`AccountsError::NoSuchUser`].
pub async fn check_password(
    accounts: &Accounts,
    passwords: &Passwords,
    settings: &LoginSettings,
    user: Uuid,
    password: &str,
    address: Option<IpAddr>,
) -> Result<(), LoginError> {
    let pool = &accounts.pool;
    let row: Option<(Option<Vec<u8>>, Option<String>)> = sqlx::query_as(
        "SELECT email_blind_index, password_hash FROM users WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(user)
    .fetch_optional(pool)
    .await?;
    let (Some(account_key), hash) = row.ok_or(AccountsError::NoSuchUser)? else {
        return Err(AccountsError::NoSuchUser.into());
    };
    let throttle = Throttle::new(accounts, settings, account_key, address);
    throttle.refuse_if_exceeded(pool).await?;
    if verify(passwords, password, hash).await? == Verified::No {
        throttle.count_failure(pool).await?;
        tracing::info!(user_id = %user, "password check refused: wrong password");
        return Err(LoginError::BadCredentials);
    }
    throttle.clear_account(pool).await?;
    Ok(())
}

/// Sets a new password hash and revokes every other login token of the user, in one
/// transaction: whoever else held a token (a stolen one, say) is logged out by the change, while
/// `keep_token`, the one the change was made with, stays valid. Returns how many were revoked.
pub async fn change_password(
    pool: &PgPool,
    user: Uuid,
    new_hash: &str,
    keep_token: &str,
) -> Result<u64, AccountsError> {
    let mut tx = pool.begin().await?;
    let changed =
        sqlx::query("UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1 AND deleted_at IS NULL")
            .bind(user)
            .bind(new_hash)
            .execute(&mut *tx)
            .await?;
    if changed.rows_affected() == 0 {
        return Err(AccountsError::NoSuchUser);
    }
    let revoked = sqlx::query(
        "UPDATE login_tokens SET revoked_at = now()
         WHERE user_id = $1 AND token_hash <> $2 AND revoked_at IS NULL",
    )
    .bind(user)
    .bind(&token_hash(keep_token)[..])
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    tracing::info!(user_id = %user, revoked, "password changed; other login tokens revoked");
    Ok(revoked)
}

/// Verifies a password against a stored hash (the decoy when `None`) off the async threads:
/// exactly one argon2 run.
async fn verify(
    passwords: &Passwords,
    password: &str,
    hash: Option<String>,
) -> Result<Verified, AccountsError> {
    let verifier = passwords.clone();
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || verifier.verify(&password, hash.as_deref()))
        .await
        .map_err(|e| AccountsError::Invalid {
            field: "password",
            reason: format!("verification did not finish: {e}"),
        })
}

/// The failed-login throttle of one attempt: its account key (the email's blind index) and, when
/// the client is known, its address key, each with its limit.
struct Throttle {
    account_key: Vec<u8>,
    scopes: Vec<(&'static str, Vec<u8>, u32)>,
    window_secs: f64,
}

impl Throttle {
    fn new(
        accounts: &Accounts,
        settings: &LoginSettings,
        account_key: Vec<u8>,
        address: Option<IpAddr>,
    ) -> Self {
        let mut scopes = vec![(
            "account",
            account_key.clone(),
            settings.max_failures_per_account,
        )];
        if let Some(address) = address {
            scopes.push((
                "address",
                address_key(accounts, address),
                settings.max_failures_per_address,
            ));
        }
        Self {
            account_key,
            scopes,
            window_secs: settings.throttle_window.as_secs_f64(),
        }
    }

    /// [`LoginError::Throttled`] if the account or the address used up its failures in the
    /// current window.
    async fn refuse_if_exceeded(&self, pool: &PgPool) -> Result<(), LoginError> {
        for (scope, key, max) in &self.scopes {
            let over: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM window_started + make_interval(secs => $3) - now())::float8
                 FROM login_throttle
                 WHERE scope = $1 AND key = $2 AND failures >= $4
                   AND window_started > now() - make_interval(secs => $3)",
            )
            .bind(scope)
            .bind(key)
            .bind(self.window_secs)
            .bind(i32::try_from(*max).unwrap_or(i32::MAX))
            .fetch_optional(pool)
            .await?;
            if let Some(left) = over {
                tracing::warn!(scope, "login throttled");
                return Err(LoginError::Throttled {
                    retry_after_secs: left.ceil().max(1.0) as u64,
                });
            }
        }
        Ok(())
    }

    /// Counts one failure against the account and the address.
    async fn count_failure(&self, pool: &PgPool) -> Result<(), LoginError> {
        for (scope, key, _) in &self.scopes {
            sqlx::query(
                "INSERT INTO login_throttle (scope, key, window_started, failures)
                 VALUES ($1, $2, now(), 1)
                 ON CONFLICT (scope, key) DO UPDATE SET
                   failures = CASE WHEN login_throttle.window_started > now() - make_interval(secs => $3)
                                   THEN login_throttle.failures + 1 ELSE 1 END,
                   window_started = CASE WHEN login_throttle.window_started > now() - make_interval(secs => $3)
                                   THEN login_throttle.window_started ELSE now() END",
            )
            .bind(scope)
            .bind(key)
            .bind(self.window_secs)
            .execute(pool)
            .await?;
        }
        Ok(())
    }

    /// Forgets the account's failures after a right password (the address's stay).
    async fn clear_account(&self, pool: &PgPool) -> Result<(), LoginError> {
        sqlx::query("DELETE FROM login_throttle WHERE scope = 'account' AND key = $1")
            .bind(&self.account_key)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// The person a login token speaks for, with their role's permissions, if the token is known,
/// unexpired and unrevoked and its user live: one query, made on every request (no cache, so
/// logout, erasure and role changes act on the next request).
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Actor>, AccountsError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    Ok(sqlx::query_as(actor_query!(
        "FROM login_tokens t JOIN users u ON u.id = t.user_id",
        "t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > now()"
    ))
    .bind(&token_hash(token)[..])
    .fetch_optional(pool)
    .await?)
}

/// [`authenticate`] for many tokens in one query (a gateway re-checking its open live feeds
/// every second): the actor of each token that is known, unexpired and unrevoked, its user live.
pub async fn authenticate_many(
    pool: &PgPool,
    tokens: &[&str],
) -> Result<std::collections::HashMap<String, Actor>, AccountsError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        token_hash: Vec<u8>,
        #[sqlx(flatten)]
        actor: Actor,
    }
    let by_hash: std::collections::HashMap<Vec<u8>, &str> = tokens
        .iter()
        .filter(|t| t.starts_with(TOKEN_PREFIX))
        .map(|t| (token_hash(t).to_vec(), *t))
        .collect();
    if by_hash.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let hashes: Vec<Vec<u8>> = by_hash.keys().cloned().collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.token_hash, u.id AS user_id, r.name AS role,
                coalesce(array_agg(p.name) FILTER (WHERE p.name IS NOT NULL), '{}') AS permissions
         FROM login_tokens t JOIN users u ON u.id = t.user_id
         JOIN roles r ON r.id = u.role_id
         LEFT JOIN role_permissions rp ON rp.role_id = r.id
         LEFT JOIN permissions p ON p.id = rp.permission_id
         WHERE u.deleted_at IS NULL AND t.token_hash = ANY($1)
           AND t.revoked_at IS NULL AND t.expires_at > now()
         GROUP BY t.token_hash, u.id, r.name",
    )
    .bind(&hashes)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            by_hash
                .get(&row.token_hash)
                .map(|token| ((*token).to_owned(), row.actor))
        })
        .collect())
}

/// Revokes a login token.
pub async fn logout(pool: &PgPool, token: &str) -> Result<(), AccountsError> {
    sqlx::query(
        "UPDATE login_tokens SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&token_hash(token)[..])
    .execute(pool)
    .await?;
    Ok(())
}

fn new_token() -> (String, [u8; 32]) {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = token_hash(&token);
    (token, hash)
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The throttle key of a client address: keyed, so the table holds no address in clear.
fn address_key(accounts: &Accounts, address: IpAddr) -> Vec<u8> {
    #[allow(clippy::expect_used)] // HMAC takes keys of any length
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&accounts.keys.blind_index_key_bytes())
        .expect("hmac accepts 32-byte keys");
    mac.update(b"login-address/");
    mac.update(address.to_string().as_bytes());
    mac.finalize().into_bytes().to_vec()
}
