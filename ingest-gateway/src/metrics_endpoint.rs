//! A `/metrics` endpoint for processes other than the gateway (the consumer, the job runner):
//! HTTP stays in this crate, the metrics are theirs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Binds the endpoint's address, so that a taken port fails before the process starts working.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for metrics: {e}"))
}

/// Serves `registry` at `/metrics` (and `/healthz`) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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

/// The `/metrics` endpoint of a process other than the gateway: bound first (a taken port
/// fails before any work starts), served once the process's metrics are registered, stopped
/// when its work is done.
pub struct MetricsEndpoint {
    listener: tokio::net::TcpListener,
}

impl MetricsEndpoint {
    /// Binds `listen`.
    pub async fn bind(listen: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            listener: bind(listen).await?,
        })
    }

    /// The bound address.
    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `registry` until the returned handle is stopped.
    pub fn serve(self, registry: Registry) -> ServingMetrics {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(self.listener, Arc::new(registry), async move {
            let _ = stopped.await;
        }));
        ServingMetrics { stop, task }
    }
}

/// A `/metrics` endpoint being served.
pub struct ServingMetrics {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl ServingMetrics {
    /// Stops serving; a failure of the endpoint is logged (the work it reported on is done).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "the metrics endpoint failed"),
            Err(e) => tracing::warn!(error = %e, "the metrics endpoint panicked"),
        }
    }
}
