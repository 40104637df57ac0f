//! The Kafka publisher: frames go to the points topic, keyed by session id, and a request is
//! answered only after Kafka acknowledged its frame.

use std::time::{Duration, Instant};

use biofeed_backends::kafka::KafkaSettings;
use biofeed_backends::registry::{Registry, RegistrySettings};
use biofeed_schema::{Framing, SensorFrame};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::settings::FramingChoice;

/// Publishes frames to one topic.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    produce_timeout: Duration,
    framing: Framing,
}

/// The framing the gateway publishes with: for Confluent, the registry is asked once, here,
/// for the current schema's id under `<topic>-value`, and the id is kept for the gateway's
/// life (the hot path makes no registry call; a registry that goes away later changes nothing).
/// A registry that cannot be asked is an error naming the setting and the address (exit 3);
/// one that does not have the schema names `biofeed migrate` (exit 2).
pub async fn framing(
    choice: FramingChoice,
    registry: &RegistrySettings,
    topic: &str,
) -> anyhow::Result<Framing> {
    if choice == FramingChoice::SingleObject {
        return Ok(Framing::SingleObject);
    }
    match (choice, Registry::new(registry)?) {
        (FramingChoice::SingleObject, _) | (FramingChoice::Auto, None) => Ok(Framing::SingleObject),
        (FramingChoice::Confluent, None) => Err(anyhow::Error::new(
            biofeed_backends::BackendError::Misconfigured {
                setting: "BIOFEED_GATEWAY_FRAMING",
                reason: "confluent framing needs a schema registry (BIOFEED_SCHEMA_REGISTRY_URL)"
                    .to_owned(),
            },
        )),
        (FramingChoice::Confluent | FramingChoice::Auto, Some(client)) => {
            let subject = format!("{topic}-value");
            let schema_id = client.current_id(&subject).await?;
            tracing::info!(%subject, schema_id, "publishing in the Confluent wire format");
            Ok(Framing::Confluent { schema_id })
        }
    }
}

impl Publisher {
    /// An idempotent producer (`acks=all`, no duplicates on internal retries), compressed with
    /// lz4, which gives up on a frame after `produce_timeout`.
    pub fn new(
        kafka: &KafkaSettings,
        topic: &str,
        produce_timeout: Duration,
        framing: Framing,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = frame_producer_config(kafka, "biofeed-gateway")?
            .set("queue.buffering.max.kbytes", "262144")
            .set(
                "message.timeout.ms",
                produce_timeout.as_millis().to_string(),
            )
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            produce_timeout,
            framing,
        })
    }

    /// A frame's bytes as this publisher frames them.
    pub fn encode(&self, frame: &SensorFrame) -> Vec<u8> {
        biofeed_schema::encode_framed(frame, self.framing)
    }

    /// Sends one frame and waits for Kafka's acknowledgement.
    pub async fn publish(
        &self,
        key: &str,
        payload: &[u8],
        metrics: &Metrics,
    ) -> Result<(), ApiError> {
        let started = Instant::now();
        let record = FutureRecord::to(&self.topic).key(key).payload(payload);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| unavailable(&e))?;
        // librdkafka fails the delivery itself after message.timeout.ms; the extra second only
        // guards against a delivery report that never comes.
        let answer =
            tokio::time::timeout(self.produce_timeout + Duration::from_secs(1), delivery).await;
        metrics
            .produce_latency
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((e, _)))) => Err(unavailable(&e)),
            Ok(Err(_canceled)) => Err(ApiError::Unavailable {
                detail: "kafka dropped the frame before acknowledging it".to_owned(),
                retry_after_secs: 2,
            }),
            Err(_) => Err(ApiError::Unavailable {
                detail: "kafka did not acknowledge the frame in time".to_owned(),
                retry_after_secs: 2,
            }),
        }
    }

    /// Whether Kafka answers a metadata request for the topic within `timeout`.
    pub fn topic_reachable(&self, timeout: Duration) -> bool {
        self.producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
            .map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == self.topic && t.error().is_none())
            })
            .unwrap_or(false)
    }

    /// Waits for queued frames to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "frames still queued for kafka at shutdown");
        }
    }
}

/// How frames are produced: idempotent (no duplicates from internal retries), `acks=all`, lz4,
/// batched for at most 5 ms (fewer, larger produce requests: less work for the broker; a
/// device's answer waits that much longer at most). The gateway and the benchmark's direct-produce ceiling share it.
pub fn frame_producer_config(
    kafka: &KafkaSettings,
    client_id: &str,
) -> Result<rdkafka::ClientConfig, biofeed_backends::BackendError> {
    let mut config = kafka.client_config()?;
    config
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1048576")
        .set("message.max.bytes", "16000000");
    Ok(config)
}

fn unavailable(error: &KafkaError) -> ApiError {
    let detail = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => "the kafka send queue is full",
        Some(RDKafkaErrorCode::MessageTimedOut) => "kafka did not acknowledge the frame in time",
        _ => "kafka cannot take the frame now",
    };
    tracing::warn!(error = %error, "kafka refused a frame");
    ApiError::Unavailable {
        detail: detail.to_owned(),
        retry_after_secs: 2,
    }
}
