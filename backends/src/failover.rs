//! Connections to the first ClickHouse node that answers, in the configured order.
//!
//! The `clickhouse` crate addresses every request to one URL. With several nodes
//! (BIOFEED_CLICKHOUSE_URL=a,b,c), requests still name the first, and this connector makes
//! each new connection to the first node, in order, that accepts one, with TLS verifying that
//! node's own name. A node that refused a connection is passed over for a while, so that a dead
//! node costs each new connection nothing. Requests on a connection whose node died fail once
//! (the callers' retries or 503s handle that); the next connection goes elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::client::legacy::connect::HttpConnector;

use crate::clickhouse::ClickHouseNodes;

/// How long a node that refused a connection is passed over.
const PASS_OVER: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Inner = hyper_rustls::HttpsConnector<HttpConnector>;

/// A connector trying each node in order (see the module's documentation).
#[derive(Clone)]
pub struct Failover {
    inner: Inner,
    nodes: Arc<[http::uri::Authority]>,
    /// Per node, until when (ms since the epoch) it is passed over.
    passed_over_until: Arc<[AtomicU64]>,
}

impl Failover {
    /// Wraps the HTTPS connector; `nodes` in the order to try them.
    pub fn new(inner: Inner, nodes: &ClickHouseNodes) -> Self {
        let nodes: Arc<[http::uri::Authority]> = nodes
            .all()
            .iter()
            .map(|url| {
                let host = url.host_str().unwrap_or_default();
                let authority = match url.port_or_known_default() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                };
                authority
                    .parse()
                    .expect("a checked URL has a valid authority")
            })
            .collect();
        let passed_over_until = nodes.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            inner,
            nodes,
            passed_over_until,
        }
    }

    /// The nodes in the order to try them now: those not passed over first.
    fn order(&self) -> Vec<usize> {
        let now = now_ms();
        let (fresh, passed): (Vec<usize>, Vec<usize>) = (0..self.nodes.len())
            .partition(|&i| self.passed_over_until[i].load(Ordering::Relaxed) <= now);
        fresh.into_iter().chain(passed).collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl tower_service::Service<http::Uri> for Failover {
    type Response = <Inner as tower_service::Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The HTTPS connector is always ready; each attempt below waits for it anyway.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if this.nodes.len() == 1 {
                let mut inner = this.inner.clone();
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                return inner.call(uri).await;
            }
            let mut last_error: Option<BoxError> = None;
            for i in this.order() {
                let mut parts = uri.clone().into_parts();
                parts.authority = Some(this.nodes[i].clone());
                let Ok(target) = http::Uri::from_parts(parts) else {
                    continue;
                };
                let mut inner = this.inner.clone();
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                match inner.call(target).await {
                    Ok(connection) => {
                        this.passed_over_until[i].store(0, Ordering::Relaxed);
                        return Ok(connection);
                    }
                    Err(error) => {
                        tracing::warn!(node = %this.nodes[i], error = %error, "clickhouse node did not take a connection; trying the next");
                        this.passed_over_until[i]
                            .store(now_ms() + PASS_OVER.as_millis() as u64, Ordering::Relaxed);
                        last_error = Some(error);
                    }
                }
            }
            Err(last_error.unwrap_or_else(|| "no ClickHouse node to connect to".into()))
        })
    }
}
