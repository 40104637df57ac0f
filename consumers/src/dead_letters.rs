//! Dead letters: the original bytes of a frame that cannot be stored, sent to the dead-letter
//! topic with headers saying why, where from and when, so that it never blocks its partition and
//! can be re-driven with `biofeed replay --dlq` after a fix.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use biofeed_backends::kafka::KafkaSettings;

/// Header names on dead letters.
pub mod headers {
    /// Why the frame was refused.
    pub const ERROR: &str = "biofeed.error";
    /// The topic it came from.
    pub const SOURCE_TOPIC: &str = "biofeed.source.topic";
    /// The partition it came from.
    pub const SOURCE_PARTITION: &str = "biofeed.source.partition";
    /// Its offset there.
    pub const SOURCE_OFFSET: &str = "biofeed.source.offset";
    /// When it was dead-lettered (RFC 3339, UTC).
    pub const DEAD_LETTERED_AT: &str = "biofeed.dead_lettered_at";
}

/// Where a message came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A producer to the dead-letter topic.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    /// An idempotent, `acks=all` producer to `topic`.
    pub fn new(kafka: &KafkaSettings, topic: &str) -> Result<Self, crate::ConsumeError> {
        let producer = kafka
            .client_config()?
            .set("client.id", "biofeed-consumer-dlq")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.max.bytes", "16000000")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Sends a dead letter and waits until Kafka has it, retrying until it does: the source
    /// offset must not be committed before its dead letter is safe.
    pub async fn send(&self, key: Option<&[u8]>, payload: &[u8], reason: &str, source: Source<'_>) {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let (partition, offset) = (source.partition.to_string(), source.offset.to_string());
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: headers::ERROR,
                    value: Some(reason),
                })
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(source.topic),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(&offset),
                })
                .insert(Header {
                    key: headers::DEAD_LETTERED_AT,
                    value: Some(&now),
                });
            let mut record = FutureRecord::to(&self.topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => {
                    tracing::warn!(
                        reason,
                        topic = source.topic,
                        partition = source.partition,
                        offset = source.offset,
                        "dead-lettered a frame"
                    );
                    return;
                }
                Err((e, _)) => {
                    tracing::error!(error = %e, "cannot write a dead letter; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
