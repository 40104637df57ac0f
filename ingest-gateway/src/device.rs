//! The device half: devices open sessions, post points and close sessions.
//!
//! Data path of a frame: `POST /v1/sessions/{id}/points` → device token checked ([`auth`]) →
//! body read within its limit and decompressed ([`crate::body`]) → JSON or Avro parsed into a
//! [`SensorFrame`](biofeed_schema::SensorFrame) → checked against the session and its data type
//! ([`points`], [`catalog`]) → Avro single-object encoded and published to `biofeed.points.v1`
//! keyed by session id ([`publisher`]) → 202 once Kafka acknowledged. Sessions open, complete
//! and abort in [`sessions`].
//!
//! Invariants: the only half that publishes to Kafka; a device hears 2xx only after Kafka
//! acknowledged its frame; it never reads personal data — a session's location is sealed by
//! `accounts` as it arrives and never opened here — and its state holds no password hasher, no
//! login settings and no ClickHouse client.

pub mod auth;
pub mod catalog;
pub mod points;
pub mod publisher;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use biofeed_accounts::Accounts;
use moka::sync::Cache;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::access::Access;
use crate::metrics::Metrics;
use auth::DeviceTokenCache;
use catalog::CatalogHandle;
use publisher::Publisher;
use sessions::SessionFacts;

/// The device endpoints, on their own state.
pub fn routes() -> Router<DeviceState> {
    Router::new()
        .route("/v1/sessions", post(sessions::open_session))
        .route("/v1/sessions/{id}/points", post(points::post_points))
        .route(
            "/v1/sessions/{id}/complete",
            post(sessions::complete_session),
        )
        .route("/v1/sessions/{id}/abort", post(sessions::abort_session))
}

/// The limits the device handlers apply.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body after decompression.
    pub max_body_bytes: usize,
    /// Most samples per frame.
    pub max_samples_per_frame: usize,
    /// Allowed clock skew of sample times.
    pub max_clock_skew: Duration,
    /// How long a session may stay open.
    pub session_deadline: Duration,
}

/// What the device handlers share.
#[derive(Clone)]
pub struct DeviceState {
    pub(crate) inner: Arc<DeviceInner>,
}

pub(crate) struct DeviceInner {
    /// Postgres and the keys: device tokens, sessions, sealing a session's location.
    pub(crate) accounts: Accounts,
    /// May this person record?
    pub(crate) access: Access,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) catalog: CatalogHandle,
    pub(crate) sessions: Cache<Uuid, Arc<SessionFacts>>,
    pub(crate) device_tokens: DeviceTokenCache,
    /// Frame ids accepted recently: a device's retry comes within seconds; ClickHouse collapses
    /// anything older that slips through.
    pub(crate) frames_seen: Cache<(Uuid, Uuid), points::FrameState>,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
}

/// What [`DeviceState::new`] is made of.
pub(crate) struct DeviceParts {
    pub(crate) accounts: Accounts,
    pub(crate) access: Access,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) catalog: CatalogHandle,
    pub(crate) session_cache_ttl: Duration,
    pub(crate) device_tokens: DeviceTokenCache,
    pub(crate) max_in_flight: usize,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: Limits,
}

impl DeviceState {
    /// The device half's state, with empty caches.
    pub(crate) fn new(parts: DeviceParts) -> Self {
        Self {
            inner: Arc::new(DeviceInner {
                accounts: parts.accounts,
                access: parts.access,
                publisher: parts.publisher,
                catalog: parts.catalog,
                sessions: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(parts.session_cache_ttl)
                    .build(),
                device_tokens: parts.device_tokens,
                frames_seen: Cache::builder()
                    .max_capacity(1_000_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
                in_flight: Arc::new(Semaphore::new(parts.max_in_flight)),
                metrics: parts.metrics,
                limits: parts.limits,
            }),
        }
    }
}
