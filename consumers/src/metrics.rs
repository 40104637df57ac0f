//! Prometheus metrics of the consumer.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A partition, for lag.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
}

/// The consumer's metrics.
#[derive(Clone)]
pub struct ConsumerMetrics {
    /// Rows written to ClickHouse (rate = rows/s).
    pub rows_written: Counter,
    /// Frames written.
    pub frames_written: Counter,
    /// Rows per insert.
    pub batch_rows: Histogram,
    /// Seconds per insert, retries included.
    pub insert_latency: Histogram,
    /// Failed insert attempts (each retried).
    pub insert_failures: Counter,
    /// Frames sent to the dead-letter topic.
    pub dead_lettered: Counter,
    /// Failed questions to the schema registry (a frame with a schema id never seen waits).
    pub registry_failures: Counter,
    /// Frames dropped because their user is erased.
    pub dropped_erased: Counter,
    /// Frames dropped at write time because their session was no longer open or completed
    /// (aborted, expired, purged, or gone with an erased user).
    pub dropped_closed: Counter,
    /// Rows read into the batch being filled (not yet handed to an insert).
    pub batch_pending_rows: Gauge<i64, AtomicI64>,
    /// Messages behind the end of each partition.
    pub lag: Family<PartitionLabels, Gauge<i64, AtomicI64>>,
}

/// Registers each `name, help, metric;` row in `registry`, in the rows' order (the order of the
/// exposition), with a clone of the metric.
macro_rules! register {
    ($registry:expr, $($name:literal, $help:literal, $metric:expr;)*) => {
        $($registry.register($name, $help, $metric.clone());)*
    };
}

impl ConsumerMetrics {
    /// Creates the metrics and registers them under `biofeed_consumer_`.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("biofeed_consumer");
        let metrics = Self {
            rows_written: Counter::default(),
            frames_written: Counter::default(),
            batch_rows: Histogram::new(exponential_buckets(100.0, 4.0, 10)),
            insert_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            insert_failures: Counter::default(),
            dead_lettered: Counter::default(),
            registry_failures: Counter::default(),
            dropped_erased: Counter::default(),
            dropped_closed: Counter::default(),
            batch_pending_rows: Gauge::default(),
            lag: Family::default(),
        };
        // Name, help and metric, in the order they are exposed.
        register!(registry,
            "rows_written", "rows written to ClickHouse", metrics.rows_written;
            "frames_written", "frames written to ClickHouse", metrics.frames_written;
            "batch_rows", "rows per ClickHouse insert", metrics.batch_rows;
            "insert_latency_seconds", "time per insert, retries included", metrics.insert_latency;
            "insert_failures", "failed insert attempts, each retried", metrics.insert_failures;
            "dead_lettered", "frames sent to the dead-letter topic", metrics.dead_lettered;
            "registry_failures",
                "failed questions to the schema registry, each retried while the frame waits",
                metrics.registry_failures;
            "dropped_erased", "frames dropped because their user is erased", metrics.dropped_erased;
            "dropped_closed",
                "frames dropped at write time because their session is no longer open or completed",
                metrics.dropped_closed;
            "batch_pending_rows",
                "rows read into the batch being filled, not yet handed to an insert",
                metrics.batch_pending_rows;
            "lag", "messages behind the end of the partition", metrics.lag;
        );
        metrics
    }
}
