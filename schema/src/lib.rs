//! The biofeed data contract, shared by every other crate.
//!
//! Owns: the names of the Kafka topics, the Avro schema of what travels on them
//! (`avro/sensor_frame.v1.avsc`, readable by any language), the Rust [`SensorFrame`] with its
//! two framings (Avro single-object, Confluent) and the [`registry`] of every schema version the code knows, and the
//! validated newtypes built only through `parse`.
//!
//! Architecture invariant: `schema` is the leaf of the workspace. It does no I/O and depends on
//! none of our other crates, so that the contract can be read, tested and reused on its own.

pub mod codec;
pub mod frame;
pub mod registry;

pub use codec::{
    decode, decode_framed, encode, encode_framed, encode_into, encode_into_framed, writer_of,
    DecodeError, Framing, Writer,
};
pub use frame::{DataTypeName, FrameError, SensorFrame};
pub use registry::SchemaIds;

/// Kafka topic names, as created by `biofeed migrate` unless overridden in the settings.
pub mod topics {
    /// The topic devices' frames are published to: key = session id, value = a
    /// [`SensorFrame`](crate::SensorFrame) in the Avro single-object encoding or the Confluent
    /// wire format ([`Framing`](crate::Framing)).
    pub const POINTS: &str = "biofeed.points.v1";
    /// Dead letters: the original bytes of frames that could not be decoded or stored, with
    /// headers saying why, where from and when.
    pub const POINTS_DLQ: &str = "biofeed.points.dlq";
    /// Live feedback: the rolling metrics of open sessions, JSON, key `<session>/<data type>`,
    /// kept minutes only (written by the live members, read by every gateway).
    pub const LIVE: &str = "biofeed.live.v1";
}
