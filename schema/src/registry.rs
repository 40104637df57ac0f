//! Every `SensorFrame` schema version this build knows, by fingerprint.
//!
//! A message names its writer schema by fingerprint (CRC-64-AVRO of the schema's canonical
//! form), so a consumer finds the writer schema here and resolves the body into the current
//! version. To evolve the schema: add `avro/sensor_frame.vN.avsc` with the change (new fields
//! need defaults, so that old readers and new readers both resolve), add it to [`Registry::builtin`],
//! make it current, and keep every older version listed: frames written with them may still be
//! in Kafka for the retention window, and replay reads them.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::Schema;
use uuid::Uuid;

use crate::codec::DecodeError;
use crate::frame::{DataTypeName, SensorFrame};

/// The text of version 1, as other languages read it.
pub const SENSOR_FRAME_V1: &str = include_str!("../avro/sensor_frame.v1.avsc");

/// One known schema version.
#[derive(Debug, Clone)]
pub struct KnownSchema {
    /// Version number (the `vN` of the file name).
    pub version: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// CRC-64-AVRO fingerprint, as the 8 little-endian header bytes read as a `u64`.
    pub fingerprint: u64,
    /// The schema's text, as written (defaults and docs kept): what a schema registry holds.
    pub text: String,
}

impl KnownSchema {
    /// Parses a schema text.
    pub fn parse(version: u32, text: &str) -> Result<Self, String> {
        let schema = Schema::parse_str(text).map_err(|e| format!("schema v{version}: {e}"))?;
        let bytes = schema.fingerprint::<Rabin>().bytes;
        let fingerprint = u64::from_le_bytes(
            bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("schema v{version}: fingerprint is not 8 bytes"))?,
        );
        Ok(Self {
            version,
            schema,
            fingerprint,
            text: text.to_owned(),
        })
    }
}

/// An ordered set of known versions; the last is the current one.
#[derive(Debug, Clone)]
pub struct Registry {
    versions: Vec<KnownSchema>,
}

static BUILTIN: LazyLock<Registry> = LazyLock::new(Registry::builtin);

impl Registry {
    /// The versions compiled into this build.
    ///
    /// # Panics
    /// When a built-in schema does not parse, which the unit tests rule out.
    pub fn builtin() -> Self {
        #[allow(clippy::expect_used)] // a constant, checked by the tests
        let v1 = KnownSchema::parse(1, SENSOR_FRAME_V1).expect("built-in schema v1 parses");
        Self { versions: vec![v1] }
    }

    /// These versions plus another, which becomes known but not current (tests of evolution).
    pub fn with_version(mut self, version: KnownSchema) -> Self {
        let current = self.versions.pop();
        self.versions.push(version);
        self.versions.extend(current);
        self
    }

    /// Every version, oldest first; the last is the current one.
    pub fn versions(&self) -> &[KnownSchema] {
        &self.versions
    }

    /// The version new frames are written with.
    pub fn current(&self) -> &KnownSchema {
        &self.versions[self.versions.len() - 1]
    }

    /// The version with this fingerprint.
    pub fn by_fingerprint(&self, fingerprint: u64) -> Option<&KnownSchema> {
        self.versions.iter().find(|v| v.fingerprint == fingerprint)
    }

    /// Decodes a single-object encoded frame of any version in this registry.
    pub fn decode(&self, bytes: &[u8]) -> Result<SensorFrame, DecodeError> {
        crate::codec::decode_with(self, &SchemaIds::default(), bytes)
    }

    /// Decodes a frame in either framing, resolving it into this registry's current version.
    pub fn decode_framed(&self, ids: &SchemaIds, bytes: &[u8]) -> Result<SensorFrame, DecodeError> {
        crate::codec::decode_with(self, ids, bytes)
    }
}

/// Writer schemas by their id in a schema registry: what a reader of Confluent-framed frames
/// has learnt from the registry. A schema here need not be one this build knows: with the
/// subject's compatibility rule, any version the registry took resolves into the current one
/// (a newer writer's extra fields are skipped, as Avro resolution does).
#[derive(Debug, Clone, Default)]
pub struct SchemaIds {
    by_id: HashMap<u32, KnownSchema>,
}

impl SchemaIds {
    /// Records the schema the registry holds under `id`.
    pub fn insert(&mut self, id: u32, schema: KnownSchema) {
        self.by_id.insert(id, schema);
    }

    /// The schema with this id, if learnt.
    pub fn get(&self, id: u32) -> Option<&KnownSchema> {
        self.by_id.get(&id)
    }

    /// How many ids are known.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no id is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The current version of this build.
pub fn current() -> &'static KnownSchema {
    BUILTIN.current()
}

/// This build's registry.
pub fn builtin() -> &'static Registry {
    &BUILTIN
}

/// Reads a body written with `writer`, resolved into the current schema of `registry`.
pub(crate) fn resolve(
    registry: &Registry,
    writer: &KnownSchema,
    body: &[u8],
) -> Result<SensorFrame, DecodeError> {
    let reader = GenericDatumReader::builder(&writer.schema)
        .reader_schema(&registry.current().schema)
        .build()
        .map_err(|e| DecodeError::Resolution(e.to_string()))?;
    let mut cursor = body;
    let value = reader
        .read_value(&mut cursor)
        .map_err(|e| DecodeError::Resolution(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(DecodeError::TrailingBytes(cursor.len()));
    }
    frame_from_value(value)
}

/// The items of the array field `name`, each taken by `item` (`None`: the item is not a `kind`).
fn array_of<T>(
    value: &Value,
    name: &str,
    kind: &str,
    item: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, DecodeError> {
    let Value::Array(items) = value else {
        return Err(DecodeError::Resolution(format!("{name} is not an array")));
    };
    items
        .iter()
        .map(|v| {
            item(v).ok_or_else(|| DecodeError::Resolution(format!("{name} holds a non-{kind}")))
        })
        .collect()
}

/// Converts a generic Avro record of the current schema into a frame.
pub fn frame_from_value(value: Value) -> Result<SensorFrame, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(DecodeError::Resolution("not a record".to_owned()));
    };
    let field = |name: &'static str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(DecodeError::Resolution(format!("missing field {name}")))
    };
    let uuid = |name: &'static str| match field(name)? {
        Value::Uuid(u) => Ok(*u),
        Value::String(s) => Uuid::try_parse(s).map_err(|_| DecodeError::BadText(name, "UUID")),
        _ => Err(DecodeError::BadText(name, "UUID")),
    };
    let long = |name: &'static str| match field(name)? {
        Value::Long(n) | Value::TimestampMicros(n) => Ok(*n),
        Value::Int(n) => Ok(i64::from(*n)),
        _ => Err(DecodeError::Resolution(format!(
            "field {name} is not a long"
        ))),
    };
    let data_type = match field("data_type")? {
        Value::String(s) => DataTypeName::parse(s)
            .map_err(|_| DecodeError::BadText("data_type", "data type name"))?,
        _ => return Err(DecodeError::BadText("data_type", "string")),
    };
    let channels = crate::codec::channels_from(long("channels")?)?;
    let offsets_us = array_of(field("offsets_us")?, "offsets_us", "long", |v| match v {
        Value::Long(n) => Some(*n),
        _ => None,
    })?;
    let values = array_of(field("values")?, "values", "float", |v| match v {
        Value::Float(f) => Some(*f),
        _ => None,
    })?;
    Ok(SensorFrame {
        frame_id: uuid("frame_id")?,
        session_id: uuid("session_id")?,
        user_id: uuid("user_id")?,
        device_id: uuid("device_id")?,
        data_type,
        channels,
        received_at_us: long("received_at_us")?,
        t0_us: long("t0_us")?,
        offsets_us,
        values,
    })
}

#[cfg(test)]
mod tests {
    use apache_avro::GenericSingleObjectWriter;

    use super::*;
    use crate::codec::encode;

    /// Version 1 plus an optional field, as a later version would add one.
    fn v2_text() -> String {
        SENSOR_FRAME_V1.replace(
            r#"{"name": "values","#,
            r#"{"name": "firmware", "type": ["null", "string"], "default": null},
    {"name": "values","#,
        )
    }

    fn frame() -> SensorFrame {
        SensorFrame {
            frame_id: Uuid::from_u128(10),
            session_id: Uuid::from_u128(11),
            user_id: Uuid::from_u128(12),
            device_id: Uuid::from_u128(13),
            data_type: DataTypeName::parse("spo2").unwrap(),
            channels: 1,
            received_at_us: 5,
            t0_us: 1_000_000,
            offsets_us: vec![0, 1_000_000],
            values: vec![97.0, 96.5],
        }
    }

    #[test]
    fn the_builtin_schema_parses_and_has_a_stable_fingerprint() {
        let v1 = current();
        assert_eq!(v1.version, 1);
        // Frames in Kafka carry this number: editing v1 would orphan them. Add a new version.
        assert_eq!(format!("{:016x}", v1.fingerprint), "17db61026c9d0647");
        assert_eq!(
            builtin().by_fingerprint(v1.fingerprint).map(|k| k.version),
            Some(1)
        );
    }

    #[test]
    fn a_v1_frame_is_read_by_a_v2_reader_with_the_new_field_defaulted() {
        let v2 = KnownSchema::parse(2, &v2_text()).unwrap();
        assert_ne!(v2.fingerprint, current().fingerprint);
        let bytes = encode(&frame());
        let reader = GenericDatumReader::builder(&current().schema)
            .reader_schema(&v2.schema)
            .build()
            .unwrap();
        let value = reader.read_value(&mut &bytes[10..]).unwrap();
        let Value::Record(fields) = value else {
            panic!("record")
        };
        let firmware = fields
            .iter()
            .find(|(n, _)| n == "firmware")
            .map(|(_, v)| v.clone());
        assert_eq!(firmware, Some(Value::Union(0, Box::new(Value::Null))));
        let values = fields
            .iter()
            .find(|(n, _)| n == "values")
            .map(|(_, v)| v.clone());
        assert_eq!(
            values,
            Some(Value::Array(vec![Value::Float(97.0), Value::Float(96.5)]))
        );
    }

    #[test]
    fn a_frame_written_with_a_newer_known_version_resolves_to_the_current_one() {
        let v2 = KnownSchema::parse(2, &v2_text()).unwrap();
        let registry = Registry::builtin().with_version(v2.clone());
        assert_eq!(registry.current().version, 1);

        // Write with v2 through the generic writer, with the new field set.
        let bytes = encode(&frame());
        let reader = GenericDatumReader::builder(&current().schema)
            .reader_schema(&v2.schema)
            .build()
            .unwrap();
        let Value::Record(mut fields) = reader.read_value(&mut &bytes[10..]).unwrap() else {
            panic!()
        };
        for (name, value) in &mut fields {
            if name == "firmware" {
                *value = Value::Union(1, Box::new(Value::String("2.1.0".to_owned())));
            }
        }
        let mut writer = GenericSingleObjectWriter::new_with_capacity(&v2.schema, 1024).unwrap();
        let mut v2_bytes = Vec::new();
        writer
            .write_value(Value::Record(fields), &mut v2_bytes)
            .unwrap();

        assert_eq!(registry.decode(&v2_bytes), Ok(frame()));
        // This build's own registry does not know v2: a typed error, not garbage.
        assert_eq!(
            crate::codec::decode(&v2_bytes),
            Err(DecodeError::UnknownFingerprint(v2.fingerprint))
        );

        // The same v2 body, Confluent-framed with the id a registry gave v2: a reader that
        // learnt v2 from the registry resolves it though this build never knew v2.
        let mut confluent = vec![0, 0, 0, 0x01, 0x02];
        confluent.extend_from_slice(&v2_bytes[10..]);
        let mut ids = SchemaIds::default();
        assert_eq!(
            crate::codec::decode_framed(&ids, &confluent),
            Err(DecodeError::UnknownSchemaId(258))
        );
        ids.insert(258, v2);
        assert_eq!(crate::codec::decode_framed(&ids, &confluent), Ok(frame()));
    }

    #[test]
    fn both_framings_carry_the_same_body_and_read_back() {
        let frame = frame();
        let single = encode(&frame);
        let confluent =
            crate::codec::encode_framed(&frame, crate::codec::Framing::Confluent { schema_id: 7 });
        assert_eq!(&confluent[..5], &[0, 0, 0, 0, 7]);
        assert_eq!(&confluent[5..], &single[10..]);
        let mut ids = SchemaIds::default();
        ids.insert(7, current().clone());
        assert_eq!(
            crate::codec::decode_framed(&ids, &confluent),
            Ok(frame.clone())
        );
        assert_eq!(
            crate::codec::decode_framed(&ids, &single),
            Ok(frame.clone())
        );
        // Another id, a short header, a magic byte of neither framing: typed errors.
        let mut other = confluent.clone();
        other[4] = 8;
        assert_eq!(
            crate::codec::decode_framed(&ids, &other),
            Err(DecodeError::UnknownSchemaId(8))
        );
        assert_eq!(
            crate::codec::decode_framed(&ids, &confluent[..3]),
            Err(DecodeError::TooShort(3))
        );
        for magic in [0x01, 0x7b, 0xc2, 0xff] {
            let mut bad = confluent.clone();
            bad[0] = magic;
            assert_eq!(
                crate::codec::decode_framed(&ids, &bad),
                Err(DecodeError::BadMagic),
                "magic {magic:#x}"
            );
        }
        let mut half = single.clone();
        half[1] = 0x02;
        assert_eq!(
            crate::codec::decode_framed(&ids, &half),
            Err(DecodeError::BadMagic)
        );
        assert_eq!(
            crate::codec::decode_framed(&ids, &[]),
            Err(DecodeError::TooShort(0))
        );
        // A schema id naming a schema that is not a SensorFrame: a resolution error.
        ids.insert(
            9,
            KnownSchema::parse(
                0,
                r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#,
            )
            .unwrap(),
        );
        other[4] = 9;
        assert!(matches!(
            crate::codec::decode_framed(&ids, &other),
            Err(DecodeError::Resolution(_))
        ));
    }
}
