//! The HTTP face of biofeed: devices open sessions and post points here.
//!
//! Data path of a frame: `POST /v1/sessions/{id}/points` → device token checked ([`auth`]) →
//! body read within its limit and decompressed ([`body`]) → JSON or Avro parsed into a
//! [`SensorFrame`](biofeed_schema::SensorFrame) → checked against the session and its data type
//! ([`points`]) → Avro single-object encoded and published to `biofeed.points.v1` keyed by session
//! id ([`publisher`]) → 202 once Kafka acknowledged. Every refusal is an RFC 7807 problem
//! ([`problem`]). `/healthz`, `/readyz`, `/metrics` and `/openapi.json` serve operators.
//!
//! People use the same service ([`people`], [`reads`], [`export`]): sign-up, login, their profile,
//! relationships, and reads of sessions and points (from ClickHouse), each decided by the accounts
//! policy and audited there.
//!
//! Owns the session endpoints and the Postgres tables `sessions` and `session_data_types` (their
//! SQL lives in `migrations/postgres`), and publishing to the points topic.
//!
//! Architecture invariants: the only crate that speaks HTTP (axum); a device hears 2xx only after
//! Kafka acknowledged its frame; it decides no access by itself (every read or change of a person's
//! data asks `accounts`' policy; device tokens and PII go through `accounts`) and only reads
//! ClickHouse, never writes to it. Nothing personal goes to Kafka or the logs.

pub mod auth;
pub mod body;
pub mod catalog;
pub mod export;
pub mod metrics;
pub mod metrics_endpoint;
pub mod people;
pub mod points;
pub mod problem;
pub mod publisher;
pub mod reads;
pub mod sessions;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use biofeed_accounts::devices::DeviceIdentity;
use biofeed_accounts::Accounts;
use moka::sync::Cache;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use utoipa::OpenApi;
use uuid::Uuid;

use crate::catalog::CatalogHandle;
use crate::metrics::{Metrics, RequestLabels};
use crate::problem::ApiError;
use crate::publisher::Publisher;
use crate::sessions::SessionFacts;
pub use crate::settings::GatewaySettings;

/// The limits the handlers apply.
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

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    accounts: Accounts,
    clickhouse: biofeed_backends::clickhouse::ClickHouse,
    passwords: biofeed_accounts::passwords::Passwords,
    login: biofeed_accounts::login::LoginSettings,
    policy: biofeed_accounts::policy::Policy,
    terms_version: String,
    max_read_points: u32,
    publisher: Publisher,
    catalog: CatalogHandle,
    sessions: Cache<Uuid, Arc<SessionFacts>>,
    auth_cache: Cache<[u8; 32], Option<DeviceIdentity>>,
    frames_seen: Cache<(Uuid, Uuid), points::FrameState>,
    in_flight: Arc<Semaphore>,
    metrics: Metrics,
    limits: Limits,
}

/// The running gateway, bound to its port.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Connects to Postgres and Kafka (failing fast, naming the setting) and binds the listener.
    pub async fn build(settings: GatewaySettings) -> anyhow::Result<Self> {
        let pool = settings.postgres.connect().await?;
        let clickhouse = settings.clickhouse.connect().await?;
        settings.kafka.connect_admin().await?;
        let passwords = biofeed_accounts::passwords::Passwords::new(&settings.passwords)?;
        let publisher = Publisher::new(
            &settings.kafka,
            &settings.topics.points,
            settings.produce_timeout,
        )?;
        let catalog = CatalogHandle::load(&pool).await?;
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (BIOFEED_GATEWAY_LISTEN): {e}",
                settings.listen
            )
        })?;
        let max_in_flight = settings.max_in_flight as usize;
        let state = AppState {
            inner: Arc::new(Inner {
                accounts: Accounts {
                    pool,
                    keys: settings.keys,
                },
                clickhouse,
                passwords,
                login: settings.login,
                policy: biofeed_accounts::policy::Policy {
                    consent: settings.consent,
                },
                terms_version: settings.terms_version,
                max_read_points: settings.max_read_points,
                publisher,
                catalog,
                sessions: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(settings.session_cache_ttl)
                    .build(),
                auth_cache: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(settings.auth_cache_ttl)
                    .build(),
                // Frame ids accepted recently: a device's retry comes within seconds; ClickHouse
                // collapses anything older that slips through.
                frames_seen: Cache::builder()
                    .max_capacity(1_000_000)
                    .time_to_live(Duration::from_secs(600))
                    .build(),
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                metrics: Metrics::default(),
                limits: Limits {
                    max_body_bytes: usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX),
                    max_samples_per_frame: settings.max_samples_per_frame as usize,
                    max_clock_skew: settings.max_clock_skew,
                    session_deadline: settings.session_deadline,
                },
            }),
        };
        Ok(Self { listener, state })
    }

    /// The bound address (port 0 in the settings picks a free port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish and flushes Kafka.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        tracing::info!(address = %self.listener.local_addr()?, "gateway listening");
        axum::serve(
            self.listener,
            router(self.state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        state.inner.publisher.flush(Duration::from_secs(10));
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Runs the gateway until SIGTERM or Ctrl-C.
pub async fn run(settings: GatewaySettings) -> anyhow::Result<()> {
    let shutdown = biofeed_backends::shutdown::Shutdown::on_signal();
    Application::build(settings)
        .await?
        .run_until(shutdown.wait())
        .await
}

/// The OpenAPI description of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "biofeed gateway", description = "Devices open sessions and post biofeedback points; \
        people sign up, log in, manage their profile and relationships, and read the data the access \
        policy lets them read."),
    paths(sessions::open_session, points::post_points, sessions::complete_session, sessions::abort_session,
        people::sign_up, people::log_in, people::log_out, people::get_me, people::patch_me, people::delete_me,
        export::export_me, people::register_device, people::list_devices, people::revoke_device, people::invite, people::list_relationships, people::accept, people::revoke,
        reads::user_sessions, reads::session, reads::session_points, reads::session_metrics, reads::access_log),
    components(schemas(problem::Problem, points::JsonFrame, points::FrameAccepted, sessions::OpenSession,
        sessions::SessionOpened, sessions::CompleteSession, sessions::SessionClosed, people::SignUp,
        people::SignedUp, people::Login, people::Token, people::ProfilePatch, people::EraseMe, people::Invite, people::RegisterDevice, people::DeviceRegistered,
        reads::SessionView, reads::Sample, reads::Bucket, reads::Points, reads::SessionMetric, reads::SessionMetrics)),
    modifiers(&TokenSchemes),
    tags((name = "sessions", description = "a device's sessions"), (name = "points", description = "samples"),
        (name = "accounts", description = "sign-up, login, one's own profile, export and erasure"),
        (name = "relationships", description = "guardians and practitioners, with consent"),
        (name = "reads", description = "reading data, as the access policy allows; every read of another person's data is audited"))
)]
pub struct ApiDoc;

struct TokenSchemes;

impl utoipa::Modify for TokenSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "device_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a device token from `biofeed admin device create`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "login_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a login token from `POST /v1/auth/login`"))
                    .build(),
            ),
        );
    }
}

/// The whole HTTP application, for `serve` and for tests.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/sessions", post(sessions::open_session))
        .route("/v1/sessions/{id}/points", post(points::post_points))
        .route(
            "/v1/sessions/{id}/complete",
            post(sessions::complete_session),
        )
        .route("/v1/sessions/{id}/abort", post(sessions::abort_session))
        .route("/v1/sessions/{id}", get(reads::session))
        .route("/v1/sessions/{id}/points", get(reads::session_points))
        .route("/v1/sessions/{id}/metrics", get(reads::session_metrics))
        .route("/v1/users", post(people::sign_up))
        .route("/v1/users/{id}/sessions", get(reads::user_sessions))
        .route("/v1/users/{id}/access-log", get(reads::access_log))
        .route("/v1/auth/login", post(people::log_in))
        .route("/v1/auth/logout", post(people::log_out))
        .route(
            "/v1/me",
            get(people::get_me)
                .patch(people::patch_me)
                .delete(people::delete_me),
        )
        .route("/v1/me/export", get(export::export_me))
        .route(
            "/v1/me/devices",
            post(people::register_device).get(people::list_devices),
        )
        .route("/v1/me/devices/{id}/revoke", post(people::revoke_device))
        .route(
            "/v1/relationships",
            post(people::invite).get(people::list_relationships),
        )
        .route("/v1/relationships/{id}/accept", post(people::accept))
        .route("/v1/relationships/{id}/revoke", post(people::revoke))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        // Axum's own 404 and 405 have empty bodies; every refusal is a problem. The 405 keeps the
        // `Allow` header axum adds (it is only set when the answer has none).
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(
            |method: Method| async move { ApiError::MethodNotAllowed(method) },
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    state
        .inner
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn readyz(State(state): State<AppState>) -> Response {
    let inner = Arc::clone(&state.inner);
    let postgres = sqlx::query("SELECT 1")
        .execute(&inner.accounts.pool)
        .await
        .is_ok();
    let clickhouse = inner
        .clickhouse
        .client()
        .query("SELECT 1")
        .execute()
        .await
        .is_ok();
    let kafka = tokio::task::spawn_blocking(move || {
        inner.publisher.topic_reachable(Duration::from_secs(2))
    })
    .await
    .unwrap_or(false);
    let body = serde_json::json!({
        "postgres": if postgres { "ok" } else { "unreachable" },
        "kafka": if kafka { "ok" } else { "unreachable" },
        "clickhouse": if clickhouse { "ok" } else { "unreachable" },
    });
    let status = if postgres && kafka && clickhouse {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.inner.metrics.render(),
    )
        .into_response()
}
