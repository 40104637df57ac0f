//! The people half: sign-up, login and logout ([`accounts`]), one's own profile ([`profile`]),
//! devices ([`devices`]) and relationships ([`relationships`]), reads of sessions, points,
//! metrics and the access log ([`reads`], from Postgres and ClickHouse), and the export
//! ([`export`]). Every decision about whose data may be touched is the accounts policy's
//! ([`Policy::authorize`]); these handlers parse, call `accounts` (or read what it allowed), and
//! answer: they decide nothing themselves.
//!
//! Invariants: never publishes to Kafka (its state holds no producer); only reads ClickHouse;
//! login tokens are checked on every request, no cache.
//!
//! [`Policy::authorize`]: biofeed_accounts::policy::Policy::authorize

pub mod accounts;
pub mod auth;
pub mod devices;
pub mod export;
pub mod live;
pub mod profile;
pub mod reads;
pub mod recordings;
pub mod relationships;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use biofeed_accounts::login::LoginSettings;
use biofeed_accounts::passwords::Passwords;
use biofeed_accounts::policy::{Action, Actor};
use biofeed_accounts::Accounts;
use biofeed_backends::clickhouse::ClickHouse;
use sqlx::PgPool;
use tower_http::set_header::SetResponseHeaderLayer;
use uuid::Uuid;

use crate::access::Access;
use crate::body::{parse_json, read_body};
use crate::device::auth::DeviceTokenCache;
use crate::metrics::Metrics;
use crate::problem::ApiError;

/// Largest JSON body of these endpoints.
const BODY_LIMIT: usize = 64 * 1024;

/// The people endpoints, on their own state.
pub fn routes() -> Router<PeopleState> {
    Router::new()
        .route("/v1/sessions/{id}", get(reads::session))
        .route("/v1/sessions/{id}/points", get(reads::session_points))
        .route("/v1/sessions/{id}/metrics", get(reads::session_metrics))
        .route("/v1/sessions/{id}/export", get(export::export_session))
        .route("/v1/sessions/{id}/live", get(live::session_live))
        .route("/v1/users", post(accounts::sign_up))
        .route("/v1/users/{id}/sessions", get(reads::user_sessions))
        .route("/v1/users/{id}/export", get(export::export_person))
        .route("/v1/users/{id}/access-log", get(reads::access_log))
        .route("/v1/auth/login", post(accounts::log_in))
        .route("/v1/auth/session", post(accounts::web_log_in))
        .route("/v1/auth/logout", post(accounts::log_out))
        .route("/v1/me/people", get(reads::people))
        .route("/v1/users/{id}/trend", get(reads::trend))
        .route("/v1/data-types", get(reads::data_types))
        .route("/v1/terms", get(accounts::terms))
        .route(
            "/v1/me",
            get(profile::get_me)
                .patch(profile::patch_me)
                .delete(profile::delete_me),
        )
        .route("/v1/me/export", get(export::export_me))
        .route("/v1/me/followers/export", get(export::export_followers))
        .route(
            "/v1/me/devices",
            post(devices::register_device).get(devices::list_devices),
        )
        .route("/v1/me/devices/{id}/revoke", post(devices::revoke_device))
        .route(
            "/v1/relationships",
            post(relationships::invite).get(relationships::list_relationships),
        )
        .route("/v1/relationships/{id}/accept", post(relationships::accept))
        .route("/v1/relationships/{id}/revoke", post(relationships::revoke))
        // People's data is not for shared caches or the browser's disk cache.
        .layer(SetResponseHeaderLayer::if_not_present(
            CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
}

/// What the people handlers share.
#[derive(Clone)]
pub struct PeopleState {
    pub(crate) inner: Arc<PeopleInner>,
}

pub(crate) struct PeopleInner {
    /// Postgres and the keys.
    pub(crate) accounts: Accounts,
    /// The points and metrics, read only.
    pub(crate) clickhouse: ClickHouse,
    pub(crate) passwords: Passwords,
    pub(crate) login: LoginSettings,
    pub(crate) access: Access,
    pub(crate) terms_version: String,
    pub(crate) max_read_points: u32,
    /// Whether the login cookie is marked `Secure` (HTTPS served here or by a proxy in front).
    pub(crate) secure_cookies: bool,
    /// Forgotten when a device is revoked or a person erased, so their devices stop at once.
    pub(crate) device_tokens: DeviceTokenCache,
    pub(crate) metrics: Arc<Metrics>,
    /// The live topic's reader: the feeds of open sessions.
    pub(crate) live: biofeed_live::hub::Hub,
    /// The open live feeds, re-checked together every second.
    pub(crate) live_watchers: live::Watchers,
}

impl PeopleState {
    /// The people half's state; starts the re-check of its live feeds (which ends with it).
    pub(crate) fn new(inner: PeopleInner) -> Self {
        let inner = Arc::new(inner);
        tokio::spawn(live::recheck_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Postgres.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.inner.accounts.pool
    }

    /// Asks the accounts policy whether `actor` may do `action` to `subject`'s data (it audits);
    /// a refusal is its answer, 404 or 403.
    async fn allow(&self, actor: &Actor, action: Action, subject: Uuid) -> Result<(), ApiError> {
        self.inner.access.allow(actor, action, subject).await
    }

    /// Like [`Self::allow`] (asked and audited the same), for listings that leave out what the
    /// policy refuses: a refusal is `false`, any other failure an error.
    async fn allows(&self, actor: &Actor, action: Action, subject: Uuid) -> Result<bool, ApiError> {
        match self.allow(actor, action, subject).await {
            Ok(()) => Ok(true),
            Err(ApiError::NotFound(_) | ApiError::Forbidden(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks the accounts policy whether `actor` may manage their own `resource` (profile,
    /// devices, …); their id if so.
    async fn allow_own(&self, actor: &Actor, resource: &'static str) -> Result<Uuid, ApiError> {
        let me = actor.user_id;
        self.allow(actor, Action::ManageProfile { resource }, me)
            .await?;
        Ok(me)
    }
}

/// A created thing: 201 with its JSON.
fn created<T>(body: T) -> (StatusCode, Json<T>) {
    (StatusCode::CREATED, Json(body))
}

/// A JSON body of at most [`BODY_LIMIT`] bytes.
async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<T, ApiError> {
    parse_json(&read_body(headers, body, BODY_LIMIT).await?)
}

/// The peer's address, for the per-address throttle (absent when the router runs without
/// connection info, e.g. in a test calling it directly; then only the per-account throttle
/// applies).
fn peer_address(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}
