//! A `/metrics` endpoint for processes other than the gateway (the consumer, the job runner):
//! HTTP stays in this crate, the metrics are theirs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Serves `registry` at `http://{listen}/metrics` (and `/healthz`) until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for metrics: {e}"))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move {
                    let mut out = String::new();
                    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
                        tracing::warn!(error = %e, "could not encode metrics");
                    }
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        out,
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    tracing::info!(address = %listener.local_addr()?, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
