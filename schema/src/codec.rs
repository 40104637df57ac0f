//! The two framings of a [`SensorFrame`] on Kafka, each a header naming the writer schema and
//! then the Avro binary body:
//!
//! - **Avro single-object encoding**: `C3 01`, the writer schema's 8-byte CRC-64-AVRO
//!   fingerprint (little-endian). Needs no registry: the fingerprint is of the schema itself.
//! - **The Confluent wire format**: `00`, the writer schema's id in a schema registry (4 bytes,
//!   big-endian). What Kafka Connect, ksqlDB, kcat, ClickHouse's `AvroConfluent` and every
//!   Confluent client read; the id means something only together with the registry.
//!
//! Readers take both ([`decode_framed`]), so a topic can move from one framing to the other
//! without a stop; the schema ids a reader knows come from the registry ([`SchemaIds`]).
//!
//! The body of the current schema version is written and read by a codec specialised to its
//! layout, because the generic path (`apache_avro::types::Value`) allocates a value per sample
//! and is many times slower on 1 kHz multichannel frames. The tests hold this codec to the
//! generic one and to Python's fastavro, using only the `.avsc` file. Frames written with another
//! known version are read through [`registry`](crate::registry) by schema resolution.
//!
//! Decoding trusts nothing: every length is checked against the bytes that remain before
//! anything is allocated, so a hostile frame costs at most its own size.

use uuid::Uuid;

use crate::frame::{DataTypeName, SensorFrame};
use crate::registry::{self, SchemaIds};

/// The two bytes every Avro single-object message starts with.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];

/// Header length: magic plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// The byte every Confluent wire-format message starts with.
pub const CONFLUENT_MAGIC: u8 = 0;

/// Confluent header length: magic plus the schema id.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// How a frame's bytes name their writer schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Avro single-object encoding: `C3 01` and the schema's fingerprint.
    SingleObject,
    /// The Confluent wire format: `00` and the schema's id in the registry.
    Confluent {
        /// The id the registry gave the current schema version under the topic's subject.
        schema_id: u32,
    },
}

/// The writer schema a frame's header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// Single-object: the schema's CRC-64-AVRO fingerprint.
    Fingerprint(u64),
    /// Confluent: the schema's id in the registry.
    SchemaId(u32),
}

/// The writer schema named by `bytes`' header, and the body after it.
pub fn writer_of(bytes: &[u8]) -> Result<(Writer, &[u8]), DecodeError> {
    match bytes.first() {
        Some(&CONFLUENT_MAGIC) => {
            let header = bytes
                .get(..CONFLUENT_HEADER_LEN)
                .ok_or(DecodeError::TooShort(bytes.len()))?;
            let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            Ok((Writer::SchemaId(id), &bytes[CONFLUENT_HEADER_LEN..]))
        }
        Some(&b) if b == MAGIC[0] => {
            if bytes.get(1).is_some_and(|b| *b != MAGIC[1]) {
                return Err(DecodeError::BadMagic);
            }
            if bytes.len() < HEADER_LEN {
                return Err(DecodeError::TooShort(bytes.len()));
            }
            let mut fingerprint = [0u8; 8];
            fingerprint.copy_from_slice(&bytes[2..HEADER_LEN]);
            Ok((
                Writer::Fingerprint(u64::from_le_bytes(fingerprint)),
                &bytes[HEADER_LEN..],
            ))
        }
        Some(_) => Err(DecodeError::BadMagic),
        None => Err(DecodeError::TooShort(0)),
    }
}

/// Why bytes are not a frame. Each names the field where decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("{0} bytes are too short for a frame header (Avro single-object: 10 bytes, Confluent wire format: 5)")]
    TooShort(usize),
    /// The first bytes are neither `C3 01` nor `00`.
    #[error("neither Avro single-object encoding (C3 01) nor the Confluent wire format (00): unknown magic byte")]
    BadMagic,
    /// The fingerprint is of no schema this build knows.
    #[error("unknown writer schema fingerprint {0:016x}")]
    UnknownFingerprint(u64),
    /// The Confluent schema id is of no schema the reader could get from the registry.
    #[error(
        "unknown schema id {0}: the schema registry has no such schema, or none is configured"
    )]
    UnknownSchemaId(u32),
    /// The body ended inside a field.
    #[error("truncated: the body ends inside field {0}")]
    Truncated(&'static str),
    /// A varint runs past 10 bytes.
    #[error("field {0}: malformed varint")]
    BadVarint(&'static str),
    /// A length or count is negative or larger than the bytes that remain could hold.
    #[error("field {field}: length {length} is impossible for the {remaining} bytes left")]
    BadLength {
        /// The field.
        field: &'static str,
        /// The length read.
        length: i64,
        /// Bytes left in the body.
        remaining: usize,
    },
    /// A string is not UTF-8, or a UUID string is not a UUID.
    #[error("field {0}: not valid {1}")]
    BadText(&'static str, &'static str),
    /// A number does not fit the field's range.
    #[error("field {field}: {value} is out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value read.
        value: i64,
    },
    /// Bytes remain after the last field.
    #[error("{0} bytes left over after the frame")]
    TrailingBytes(usize),
    /// A frame written with another known schema version did not resolve to this one.
    #[error("schema resolution failed: {0}")]
    Resolution(String),
}

/// Encodes a frame with the current schema version, single-object framed.
pub fn encode(frame: &SensorFrame) -> Vec<u8> {
    encode_framed(frame, Framing::SingleObject)
}

/// Encodes a frame with the current schema version in `framing`.
pub fn encode_framed(frame: &SensorFrame, framing: Framing) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(HEADER_LEN + 200 + frame.offsets_us.len() * 3 + frame.values.len() * 4);
    encode_into_framed(frame, framing, &mut out);
    out
}

/// Appends the single-object encoding of a frame to `out`.
pub fn encode_into(frame: &SensorFrame, out: &mut Vec<u8>) {
    encode_into_framed(frame, Framing::SingleObject, out);
}

/// Appends the encoding of a frame in `framing` to `out`.
pub fn encode_into_framed(frame: &SensorFrame, framing: Framing, out: &mut Vec<u8>) {
    match framing {
        Framing::SingleObject => {
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&registry::current().fingerprint.to_le_bytes());
        }
        Framing::Confluent { schema_id } => {
            out.push(CONFLUENT_MAGIC);
            out.extend_from_slice(&schema_id.to_be_bytes());
        }
    }
    put_uuid(out, frame.frame_id);
    put_uuid(out, frame.session_id);
    put_uuid(out, frame.user_id);
    put_uuid(out, frame.device_id);
    put_str(out, frame.data_type.as_str());
    put_long(out, i64::from(frame.channels));
    put_long(out, frame.received_at_us);
    put_long(out, frame.t0_us);
    if !frame.offsets_us.is_empty() {
        put_long(out, frame.offsets_us.len() as i64);
        for offset in &frame.offsets_us {
            put_long(out, *offset);
        }
    }
    out.push(0);
    if !frame.values.is_empty() {
        put_long(out, frame.values.len() as i64);
        out.reserve(frame.values.len() * 4);
        for value in &frame.values {
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
    out.push(0);
}

/// Decodes a single-object encoded frame written with any schema version this build knows (a
/// Confluent-framed one is [`DecodeError::UnknownSchemaId`]: use [`decode_framed`]).
pub fn decode(bytes: &[u8]) -> Result<SensorFrame, DecodeError> {
    decode_with(registry::builtin(), &SchemaIds::default(), bytes)
}

/// Decodes a frame in either framing: single-object with any version this build knows,
/// Confluent with any schema id in `ids` (whose schemas resolve into the current version).
pub fn decode_framed(ids: &SchemaIds, bytes: &[u8]) -> Result<SensorFrame, DecodeError> {
    decode_with(registry::builtin(), ids, bytes)
}

/// Decodes with a given registry of known versions and of registry ids.
pub(crate) fn decode_with(
    registry: &registry::Registry,
    ids: &SchemaIds,
    bytes: &[u8],
) -> Result<SensorFrame, DecodeError> {
    let (writer, body) = writer_of(bytes)?;
    let writer = match writer {
        Writer::Fingerprint(fingerprint) => {
            // The specialised codec reads the version this build writes; others resolve.
            if fingerprint == registry.current().fingerprint {
                return decode_body(body);
            }
            registry
                .by_fingerprint(fingerprint)
                .ok_or(DecodeError::UnknownFingerprint(fingerprint))?
        }
        Writer::SchemaId(id) => {
            let writer = ids.get(id).ok_or(DecodeError::UnknownSchemaId(id))?;
            if writer.fingerprint == registry.current().fingerprint {
                return decode_body(body);
            }
            writer
        }
    };
    registry::resolve(registry, writer, body)
}

/// Decodes a body written with the current schema version.
pub(crate) fn decode_body(body: &[u8]) -> Result<SensorFrame, DecodeError> {
    let mut r = Reader {
        bytes: body,
        pos: 0,
    };
    let frame_id = r.uuid("frame_id")?;
    let session_id = r.uuid("session_id")?;
    let user_id = r.uuid("user_id")?;
    let device_id = r.uuid("device_id")?;
    let data_type = r.string("data_type")?;
    let data_type = DataTypeName::parse(data_type)
        .map_err(|_| DecodeError::BadText("data_type", "data type name"))?;
    let channels = channels_from(r.long("channels")?)?;
    let received_at_us = r.long("received_at_us")?;
    let t0_us = r.long("t0_us")?;
    let offsets_us = r.long_array("offsets_us")?;
    let values = r.float_array("values")?;
    if r.pos != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - r.pos));
    }
    Ok(SensorFrame {
        frame_id,
        session_id,
        user_id,
        device_id,
        data_type,
        channels,
        received_at_us,
        t0_us,
        offsets_us,
        values,
    })
}

/// The `channels` field: an Avro int that must be 1..=65535.
pub(crate) fn channels_from(value: i64) -> Result<u16, DecodeError> {
    u16::try_from(value)
        .ok()
        .filter(|c| *c > 0)
        .ok_or(DecodeError::OutOfRange {
            field: "channels",
            value,
        })
}

fn put_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, value: &str) {
    put_long(out, value.len() as i64);
    out.extend_from_slice(value.as_bytes());
}

fn put_uuid(out: &mut Vec<u8>, value: Uuid) {
    let mut buffer = Uuid::encode_buffer();
    put_str(out, value.hyphenated().encode_lower(&mut buffer));
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn long(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        let mut n: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or(DecodeError::Truncated(field))?;
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(DecodeError::BadVarint(field));
            }
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        Err(DecodeError::BadVarint(field))
    }

    /// A string's length, which must fit in what remains.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let length = self.long(field)?;
        let remaining = self.remaining();
        usize::try_from(length)
            .ok()
            .filter(|n| *n <= remaining)
            .ok_or(DecodeError::BadLength {
                field,
                length,
                remaining,
            })
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(DecodeError::Truncated(field))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn string(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let n = self.length(field)?;
        std::str::from_utf8(self.take(field, n)?).map_err(|_| DecodeError::BadText(field, "UTF-8"))
    }

    fn uuid(&mut self, field: &'static str) -> Result<Uuid, DecodeError> {
        Uuid::try_parse(self.string(field)?).map_err(|_| DecodeError::BadText(field, "UUID"))
    }

    /// The item count of the next array block, `None` at the array's end. A count below zero
    /// is followed by the block's size in bytes (Avro allows writers to do this), which is
    /// skipped. The count must fit in what remains at `min_item_bytes` per item.
    fn block(
        &mut self,
        field: &'static str,
        min_item_bytes: usize,
    ) -> Result<Option<usize>, DecodeError> {
        let count = self.long(field)?;
        if count == 0 {
            return Ok(None);
        }
        if count < 0 {
            self.long(field)?;
        }
        let remaining = self.remaining();
        usize::try_from(count.unsigned_abs())
            .ok()
            .filter(|n| {
                n.checked_mul(min_item_bytes)
                    .is_some_and(|b| b <= remaining)
            })
            .map(Some)
            .ok_or(DecodeError::BadLength {
                field,
                length: count,
                remaining,
            })
    }

    fn long_array(&mut self, field: &'static str) -> Result<Vec<i64>, DecodeError> {
        let mut items = Vec::new();
        while let Some(n) = self.block(field, 1)? {
            items.reserve(n);
            for _ in 0..n {
                items.push(self.long(field)?);
            }
        }
        Ok(items)
    }

    fn float_array(&mut self, field: &'static str) -> Result<Vec<f32>, DecodeError> {
        let mut items = Vec::new();
        while let Some(n) = self.block(field, 4)? {
            let raw = self.take(field, n * 4)?;
            items.reserve(n);
            items.extend(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample_frame() -> SensorFrame {
        SensorFrame {
            frame_id: Uuid::from_u128(1),
            session_id: Uuid::from_u128(2),
            user_id: Uuid::from_u128(3),
            device_id: Uuid::from_u128(4),
            data_type: DataTypeName::parse("eeg").unwrap(),
            channels: 2,
            received_at_us: 1_732_400_000_000_000,
            t0_us: 1_732_399_999_000_000,
            offsets_us: vec![0, 3_906, 7_812],
            values: vec![-1.5, 2.25, 0.0, 1e-3, 1000.0, -0.5],
        }
    }

    #[test]
    fn the_generic_avro_reader_agrees_with_this_codec() {
        let frame = sample_frame();
        let bytes = encode(&frame);
        let schema = &registry::current().schema;
        let reader = apache_avro::GenericSingleObjectReader::builder()
            .schema(schema.clone())
            .build()
            .unwrap();
        let value = reader.read_value(&mut &bytes[..]).unwrap();
        assert_eq!(registry::frame_from_value(value).unwrap(), frame);
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        let bytes = encode(&sample_frame());
        assert_eq!(decode(&bytes[..5]), Err(DecodeError::TooShort(5)));
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = 0x01;
        assert_eq!(decode(&wrong_magic), Err(DecodeError::BadMagic));
        let mut unknown = bytes.clone();
        unknown[2..10].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(matches!(
            decode(&unknown),
            Err(DecodeError::UnknownFingerprint(_))
        ));
        for cut in HEADER_LEN..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncated at {cut} decodes");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn absurd_lengths_allocate_nothing() {
        // A header and a frame_id claiming a string of 2^62 bytes.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&registry::current().fingerprint.to_le_bytes());
        put_long(&mut bytes, 1 << 62);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::BadLength {
                field: "frame_id",
                ..
            })
        ));

        // A well-formed frame whose values array claims 2^40 floats.
        let frame = sample_frame();
        let mut bytes = encode(&SensorFrame {
            values: vec![],
            offsets_us: vec![],
            ..frame
        });
        bytes.truncate(bytes.len() - 1);
        put_long(&mut bytes, 1 << 40);
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::BadLength {
                field: "values",
                ..
            })
        ));

        // A negative block count of absurd size.
        let mut bytes = encode(&SensorFrame {
            values: vec![],
            offsets_us: vec![],
            ..sample_frame()
        });
        bytes.truncate(bytes.len() - 2);
        put_long(&mut bytes, -(1 << 50));
        put_long(&mut bytes, 8);
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::BadLength {
                field: "offsets_us",
                ..
            })
        ));
    }

    #[test]
    fn negative_block_counts_from_other_writers_are_read() {
        let frame = sample_frame();
        let mut bytes = encode(&SensorFrame {
            values: vec![],
            offsets_us: vec![],
            ..frame.clone()
        });
        bytes.truncate(bytes.len() - 2);
        // offsets as one block of -3 items with its byte size, as some writers do
        put_long(&mut bytes, -3);
        let mut items = Vec::new();
        for o in &frame.offsets_us {
            put_long(&mut items, *o);
        }
        put_long(&mut bytes, items.len() as i64);
        bytes.extend_from_slice(&items);
        bytes.push(0);
        put_long(&mut bytes, frame.values.len() as i64);
        for v in &frame.values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.push(0);
        assert_eq!(decode(&bytes), Ok(frame));
    }

    fn arb_frame() -> impl Strategy<Value = SensorFrame> {
        (
            any::<u128>(),
            any::<u128>(),
            any::<u128>(),
            any::<u128>(),
            "[a-z][a-z0-9_]{0,20}",
            1u16..=16,
            any::<i64>(),
            -(1i64 << 52)..(1i64 << 52),
            prop::collection::vec(0i64..10_000_000, 0..300),
        )
            .prop_flat_map(|(f, s, u, d, name, channels, received, t0, offsets)| {
                let n = offsets.len() * usize::from(channels);
                let finite =
                    prop::num::f32::NORMAL | prop::num::f32::ZERO | prop::num::f32::SUBNORMAL;
                prop::collection::vec(finite, n..=n).prop_map(move |values| SensorFrame {
                    frame_id: Uuid::from_u128(f),
                    session_id: Uuid::from_u128(s),
                    user_id: Uuid::from_u128(u),
                    device_id: Uuid::from_u128(d),
                    data_type: DataTypeName::parse(&name).unwrap(),
                    channels,
                    received_at_us: received,
                    t0_us: t0,
                    offsets_us: offsets.clone(),
                    values,
                })
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(frame in arb_frame()) {
            prop_assert_eq!(decode(&encode(&frame)), Ok(frame));
        }

        #[test]
        fn arbitrary_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&registry::current().fingerprint.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = decode(&bytes);
        }
    }
}
