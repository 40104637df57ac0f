//! The HTTP face of biofeed, in two halves on one port.
//!
//! - [`device`]: devices open sessions, post points and close sessions. Data path of a frame:
//!   `POST /v1/sessions/{id}/points` → device token checked → body read within its limit and
//!   decompressed ([`body`]) → parsed into a [`SensorFrame`](biofeed_schema::SensorFrame) →
//!   checked against the session and its data type → published to `biofeed.points.v1` keyed by
//!   session id → 202 once Kafka acknowledged.
//! - [`people`]: sign-up, login, one's profile, devices and relationships, reads of sessions and
//!   points (from ClickHouse) and the export, each decided by the accounts policy and audited
//!   there.
//!
//! Each half has its own routes and its own state, holding only what it needs; [`router`]
//! merges them with what they share: every refusal an RFC 7807 problem ([`problem`]), the
//! policy's decision counted ([`access`]), the metrics, and `/healthz`, `/readyz`, `/metrics`
//! and `/openapi.json` for operators.
//!
//! Owns the session endpoints and the Postgres tables `sessions` and `session_data_types` (their
//! SQL lives in `migrations/postgres`), and publishing to the points topic.
//!
//! Architecture invariants: the only crate that speaks HTTP (axum); a device hears 2xx only after
//! Kafka acknowledged its frame; it decides no access by itself (every read or change of a person's
//! data asks `accounts`' policy; device tokens and PII go through `accounts`) and only reads
//! ClickHouse, never writes to it. Nothing personal goes to Kafka or the logs. The device half
//! never reads personal data; the people half never publishes to Kafka.

mod access;
mod bearer;
pub mod body;
pub mod device;
pub mod metrics;
pub mod metrics_endpoint;
pub mod people;
pub mod problem;
pub mod settings;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use biofeed_accounts::Accounts;
use biofeed_backends::clickhouse::ClickHouse;
use tokio::net::TcpListener;
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi;
use uuid::Uuid;

use crate::access::Access;
use crate::device::auth::DeviceTokenCache;
use crate::device::catalog::CatalogHandle;
// The benchmark reaches the producer's settings at their old path.
pub use crate::device::publisher;
use crate::device::publisher::Publisher;
use crate::device::{DeviceParts, DeviceState, Limits};
use crate::metrics::{Metrics, RequestLabels};
use crate::people::{PeopleInner, PeopleState};
use crate::problem::ApiError;
pub use crate::settings::GatewaySettings;
use crate::tls::{CertificateStore, TlsListener};

/// The state of the whole application: each half's, and what the operator endpoints read.
#[derive(Clone)]
pub struct AppState {
    device: DeviceState,
    people: PeopleState,
    operator: Arc<Operator>,
}

/// What `/readyz` and `/metrics` read, and the request counter.
struct Operator {
    pool: sqlx::PgPool,
    clickhouse: ClickHouse,
    publisher: Arc<Publisher>,
    metrics: Arc<Metrics>,
}

/// The running gateway, bound to its port.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    https: Option<Https>,
}

/// What serving HTTPS needs: the certificate (reloaded on SIGHUP) and the HSTS header.
struct Https {
    certificate: Arc<CertificateStore>,
    hsts: HeaderValue,
}

impl Application {
    /// Reads the TLS certificate and key if configured (a bad one is a [`tls::TlsError`]),
    /// connects to Postgres and Kafka (failing fast, naming the setting) and binds the listener.
    pub async fn build(settings: GatewaySettings) -> anyhow::Result<Self> {
        let https = match settings.tls.files() {
            Some(files) => Some(Https {
                certificate: CertificateStore::load(files)?,
                hsts: HeaderValue::from_str(&format!(
                    "max-age={}",
                    settings.tls.hsts_max_age.as_secs()
                ))?,
            }),
            None => None,
        };
        let pool = settings.postgres.connect().await?;
        let clickhouse = settings.clickhouse.connect().await?;
        settings.kafka.connect_admin().await?;
        let passwords = biofeed_accounts::passwords::Passwords::new(&settings.passwords)?;
        let framing = device::publisher::framing(
            settings.framing,
            &settings.registry,
            &settings.topics.points,
        )
        .await?;
        let publisher = Publisher::new(
            &settings.kafka,
            &settings.topics.points,
            settings.produce_timeout,
            framing,
        )?;
        let catalog = CatalogHandle::load(&pool).await?;
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (BIOFEED_GATEWAY_LISTEN): {e}",
                settings.listen
            )
        })?;
        let accounts = Accounts {
            pool: pool.clone(),
            keys: settings.keys,
        };
        let metrics = Arc::new(Metrics::default());
        let access = Access::new(
            accounts.clone(),
            biofeed_accounts::policy::Policy {
                consent: settings.consent,
            },
            Arc::clone(&metrics),
        );
        let publisher = Arc::new(publisher);
        let device_tokens = DeviceTokenCache::new(settings.auth_cache_ttl);
        let state = AppState {
            device: DeviceState::new(DeviceParts {
                accounts: accounts.clone(),
                access: access.clone(),
                publisher: Arc::clone(&publisher),
                catalog,
                session_cache_ttl: settings.session_cache_ttl,
                device_tokens: device_tokens.clone(),
                max_in_flight: settings.max_in_flight as usize,
                metrics: Arc::clone(&metrics),
                limits: Limits {
                    max_body_bytes: usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX),
                    max_samples_per_frame: settings.max_samples_per_frame as usize,
                    max_clock_skew: settings.max_clock_skew,
                    session_deadline: settings.session_deadline,
                },
            }),
            people: PeopleState::new(PeopleInner {
                accounts,
                clickhouse: clickhouse.clone(),
                passwords,
                login: settings.login,
                access,
                terms_version: settings.terms_version,
                max_read_points: settings.max_read_points,
                secure_cookies: settings.secure_cookies || https.is_some(),
                device_tokens,
                metrics: Arc::clone(&metrics),
                live: biofeed_live::hub::Hub::start(&settings.kafka, &settings.topics.live)?,
                live_watchers: people::live::Watchers::default(),
            }),
            operator: Arc::new(Operator {
                pool,
                clickhouse,
                publisher,
                metrics,
            }),
        };
        Ok(Self {
            listener,
            state,
            https,
        })
    }

    /// The bound address (port 0 in the settings picks a free port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// `https` when the gateway serves HTTPS itself, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.https.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish and flushes Kafka.
    /// With a certificate, serves HTTPS only, every answer with HSTS, and reloads the certificate
    /// on SIGHUP (which never stops the gateway, with or without a certificate).
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let address = self.listener.local_addr()?;
        // SIGHUP is listened for before the port answers, so that from then on it never kills
        // the process (its default action).
        let reloads = reload_on_hangup(
            self.https.as_ref().map(|h| Arc::clone(&h.certificate)),
            Arc::clone(&state.operator.metrics),
        )?;
        let app = router(self.state);
        // Open live feeds never end by themselves: at shutdown they are ended (an `end` event)
        // so that the graceful shutdown, which waits for every connection, can finish.
        let people = state.people.clone();
        let shutdown = async move {
            shutdown.await;
            people.inner.live_watchers.close();
        };
        let served = match self.https {
            Some(https) => {
                tracing::info!(%address, "gateway listening (https)");
                let listener = TlsListener::new(self.listener, https.certificate.server_config()?)?
                    // `tap_io` makes axum hand the peer's address (`ConnectInfo`) to handlers for
                    // a listener of our own, as it does for a TCP listener.
                    .tap_io(|_| {});
                let app = app.layer(SetResponseHeaderLayer::overriding(
                    header::STRICT_TRANSPORT_SECURITY,
                    https.hsts,
                ));
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .await
            }
            None => {
                tracing::info!(%address, "gateway listening (http)");
                axum::serve(
                    self.listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .await
            }
        };
        reloads.abort();
        served?;
        state.operator.publisher.flush(Duration::from_secs(10));
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

/// Reloads the certificate on each SIGHUP until aborted: a good new pair serves new connections,
/// a bad one is logged and the old one keeps serving; open connections are untouched.
fn reload_on_hangup(
    certificate: Option<Arc<CertificateStore>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = signal(SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(certificate) = &certificate else {
                    tracing::info!("sighup: no tls certificate to reload (serving plain http)");
                    continue;
                };
                match certificate.reload() {
                    Ok(()) => {
                        tracing::info!("tls certificate reloaded");
                        metrics.tls_reloads.get_or_create(&OK).inc();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "tls certificate not reloaded: the previous one keeps serving");
                        metrics.tls_reloads.get_or_create(&FAILED).inc();
                    }
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = (certificate, metrics);
        Ok(tokio::spawn(async {}))
    }
}

const OK: metrics::OutcomeLabels = metrics::OutcomeLabels { outcome: "ok" };
const FAILED: metrics::OutcomeLabels = metrics::OutcomeLabels { outcome: "failed" };

/// The OpenAPI description of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "biofeed gateway", description = "Devices open sessions and post biofeedback points; \
        people sign up, log in, manage their profile and relationships, and read the data the access \
        policy lets them read."),
    paths(device::sessions::open_session, device::points::post_points, device::sessions::complete_session,
        device::sessions::abort_session,
        people::accounts::sign_up, people::accounts::log_in, people::accounts::log_out,
        people::profile::get_me, people::profile::patch_me, people::profile::delete_me,
        people::export::export_me, people::devices::register_device, people::devices::list_devices,
        people::devices::revoke_device, people::relationships::invite,
        people::relationships::list_relationships, people::relationships::accept, people::relationships::revoke,
        people::reads::user_sessions, people::reads::session, people::reads::session_points,
        people::reads::session_metrics, people::reads::access_log, people::export::export_session, people::live::session_live,
        people::export::export_person, people::export::export_followers,
        people::accounts::web_log_in, people::reads::people, people::reads::trend, people::reads::data_types, people::accounts::terms),
    components(schemas(problem::Problem, device::points::JsonFrame, device::points::FrameAccepted,
        device::sessions::OpenSession, device::sessions::SessionOpened, device::sessions::CompleteSession,
        device::sessions::SessionClosed, people::accounts::SignUp, people::accounts::SignedUp,
        people::accounts::Login, people::accounts::Token, people::profile::ProfilePatch, people::profile::EraseMe,
        people::relationships::Invite, people::devices::RegisterDevice, people::devices::DeviceRegistered,
        people::recordings::SessionView, people::reads::Sample, people::reads::Bucket, people::reads::Points,
        people::reads::SessionMetric, people::reads::SessionMetrics, people::accounts::WebSession,
        people::reads::Person, people::reads::TrendPoint, people::reads::DataTypeView, people::accounts::Terms)),
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
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "device_token",
            bearer("a device token from `biofeed admin device create`"),
        );
        components.add_security_scheme(
            "login_token",
            bearer("a login token from `POST /v1/auth/login` (or, from the web app's pages, the same token in the login cookie of `POST /v1/auth/session`)"),
        );
    }
}

/// The whole HTTP application, for `serve` and for tests: the device half's routes and the
/// people half's, each on its own state, merged with the operator endpoints; every answer counted
/// and every refusal, the router's own 404 and 405 included, a problem.
pub fn router(state: AppState) -> Router {
    let operator = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .with_state(Arc::clone(&state.operator));
    let app = Router::new()
        .merge(device::routes().with_state(state.device))
        .merge(people::routes().with_state(state.people))
        .merge(operator)
        .merge(web::routes())
        // Axum's own 404 and 405 have empty bodies; every refusal is a problem. The 405 keeps the
        // `Allow` header axum adds (it is only set when the answer has none).
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(
            |method: Method| async move { ApiError::MethodNotAllowed(method) },
        )
        .layer(axum::middleware::from_fn_with_state(
            state.operator,
            count_requests,
        ));
    web::harden(app)
}

/// A path's session id; a malformed one cannot name a session, so it is 404 like a missing one.
pub fn parse_session_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(id).map_err(|_| ApiError::NotFound("session"))
}

async fn count_requests(
    State(operator): State<Arc<Operator>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let response = next.run(request).await;
    operator
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

async fn readyz(State(inner): State<Arc<Operator>>) -> Response {
    let postgres = sqlx::query("SELECT 1").execute(&inner.pool).await.is_ok();
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

async fn metrics(State(operator): State<Arc<Operator>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        operator.metrics.render(),
    )
        .into_response()
}
