//! Prometheus metrics of the gateway, served at `/metrics`.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a handled request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern, e.g. `/v1/sessions/{id}/points`.
    pub route: String,
    /// The HTTP method.
    pub method: String,
    /// The status code.
    pub status: u16,
}

/// Why points were rejected.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The problem code, e.g. `invalid-value`.
    pub reason: String,
}

/// Labels of a login attempt.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `refused` or `throttled` (logins); `allowed`, `not_found` or `forbidden` (access);
    /// `ok` or `failed` (certificate reloads).
    pub outcome: &'static str,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Points (sample instants) acknowledged by Kafka.
    pub points_accepted: Counter,
    /// Points refused, by reason.
    pub points_rejected: Family<ReasonLabels, Counter>,
    /// Frames re-posted with an id already accepted.
    pub duplicate_frames: Counter,
    /// Seconds from handing a frame to the producer to Kafka's acknowledgement.
    pub produce_latency: Histogram,
    /// Point requests being handled now.
    pub in_flight: Gauge<i64, AtomicI64>,
    /// Login attempts by outcome.
    pub logins: Family<OutcomeLabels, Counter>,
    /// Access-policy decisions by outcome.
    pub access_decisions: Family<OutcomeLabels, Counter>,
    /// TLS certificate reloads (SIGHUP) by outcome.
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    /// Live feeds being watched on this gateway now.
    pub live_viewers: Gauge<i64, AtomicI64>,
    /// Live feeds ended by the gateway, by reason (logged_out, access_ended, session_closed, …).
    pub live_ended: Family<ReasonLabels, Counter>,
}

/// Registers each `name, help, metric;` row in `registry`, in the rows' order (the order of the
/// exposition), with a clone of the metric.
macro_rules! register {
    ($registry:expr, $($name:literal, $help:literal, $metric:expr;)*) => {
        $($registry.register($name, $help, $metric.clone());)*
    };
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let points_accepted = Counter::default();
        let points_rejected = Family::<ReasonLabels, Counter>::default();
        let duplicate_frames = Counter::default();
        let produce_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let in_flight = Gauge::<i64, AtomicI64>::default();
        let logins = Family::<OutcomeLabels, Counter>::default();
        let access_decisions = Family::<OutcomeLabels, Counter>::default();
        let tls_reloads = Family::<OutcomeLabels, Counter>::default();
        let live_viewers = Gauge::<i64, AtomicI64>::default();
        let live_ended = Family::<ReasonLabels, Counter>::default();
        let mut registry = Registry::with_prefix("biofeed_gateway");
        // Name, help and metric, in the order they are exposed.
        register!(registry,
            "http_requests", "HTTP requests by route, method and status", requests;
            "points_accepted", "points acknowledged by Kafka", points_accepted;
            "points_rejected", "points refused, by reason", points_rejected;
            "duplicate_frames", "frames re-posted with an already accepted id", duplicate_frames;
            "produce_latency_seconds", "time until Kafka acknowledged a frame", produce_latency;
            "in_flight_requests", "point requests being handled", in_flight;
            "logins", "login attempts by outcome (ok, refused, throttled)", logins;
            "access_decisions",
                "access-policy decisions by outcome (allowed, not_found, forbidden)",
                access_decisions;
            "tls_reloads", "certificate reloads on SIGHUP by outcome (ok, failed)", tls_reloads;
            "live_viewers", "live feeds being watched on this gateway", live_viewers;
            "live_ended", "live feeds the gateway ended, by reason", live_ended;
        );
        Self {
            registry,
            logins,
            access_decisions,
            tls_reloads,
            requests,
            points_accepted,
            points_rejected,
            duplicate_frames,
            produce_latency,
            in_flight,
            live_viewers,
            live_ended,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "could not encode metrics");
        }
        out
    }
}
