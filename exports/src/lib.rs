//! Exports of one recorded session in the formats other tools read:
//!
//! - **CSV**, one file per data type: `time` (ISO 8601 UTC, microseconds), `time_us` (µs since
//!   the epoch), then one column per channel headed `name (unit)`; values exactly as stored.
//! - **EDF+** ([`edf`]), one file per sampled data type (EEG, ECG, PPG, respiration, EDA, skin
//!   temperature, heart rate, SpO2): a signal per channel at the data type's rate, physical range
//!   from the data type's, 16-bit samples; annotations for the session's start and end, its
//!   exercise and the person's feedback. The patient field is a pseudonymous code unless the
//!   person exports their own data and asks for their name.
//! - **RR**: RR intervals in milliseconds, one per line, as Kubios and other HRV tools import.
//!
//! A session with several data types in the format exports as a zip of one file each.
//! [`Exporter::prepare`] checks everything that can be refused (the session's state, the format
//! against the data types, the points store answering) before a byte is sent, so a refusal is an
//! error answer, never a file; [`Prepared::write`] then streams the file in chunks, reading the
//! points with a cursor, so memory stays bounded whatever the session's length. If it fails
//! midway it returns the error and the caller aborts the transfer: a truncated file never looks
//! whole (an EDF file's length is also known and announced beforehand).

pub mod edf;

use std::io::Write;
use std::sync::{Arc, Mutex};

use biofeed_accounts::{users, Accounts, AccountsError};
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::Deserialize;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Chunks are sent once this many bytes are ready.
const CHUNK: usize = 256 * 1024;

/// An export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One CSV file per data type.
    Csv,
    /// One EDF+ file per sampled data type.
    Edf,
    /// RR intervals in ms, one per line.
    Rr,
}

impl Format {
    /// Every format, as the query string names them.
    pub const NAMES: &'static str = "csv, edf, rr";

    /// The format named `name`.
    pub fn parse(name: &str) -> Result<Self, ExportError> {
        match name {
            "csv" => Ok(Self::Csv),
            "edf" => Ok(Self::Edf),
            "rr" => Ok(Self::Rr),
            other => Err(ExportError::Unsupported {
                field: "format",
                reason: format!("unknown format '{other}': one of {}", Self::NAMES),
            }),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Edf => "edf",
            Self::Rr => "txt",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8; header=present",
            Self::Edf => "application/octet-stream",
            Self::Rr => "text/plain; charset=utf-8",
        }
    }
}

/// Why an export failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The session does not exist (any more).
    #[error("session not found")]
    NotFound,
    /// The session cannot be exported in its state (open, purged, …).
    #[error("{0}")]
    NotExportable(String),
    /// The request asks for what the format or the session cannot give.
    #[error("{field}: {reason}")]
    Unsupported {
        /// The query parameter or option at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Postgres or the keys failed.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// The points store failed.
    #[error("clickhouse: {0}")]
    Points(#[from] clickhouse::error::Error),
    /// Writing the file failed (a bug, or the samples disagree with what was planned).
    #[error("writing the export: {0}")]
    Write(String),
    /// The reader went away.
    #[error("the reader of the export went away")]
    Closed,
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> Self {
        ExportError::Accounts(e.into())
    }
}

impl From<std::io::Error> for ExportError {
    fn from(e: std::io::Error) -> Self {
        ExportError::Write(e.to_string())
    }
}

/// A data type as the session streamed it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DataType {
    /// E.g. `eeg`.
    pub name: String,
    /// E.g. `µV`.
    pub unit: String,
    /// Samples per second; `None` for an event stream (RR intervals).
    pub sample_rate_hz: Option<f32>,
    /// The smallest value allowed.
    pub min_value: f32,
    /// The largest value allowed.
    pub max_value: f32,
    /// The channels' names, in order.
    #[sqlx(json)]
    pub labels: Vec<String>,
}

impl DataType {
    /// The rate in whole Hz, if the data type is sampled at one.
    fn whole_rate(&self) -> Option<u32> {
        let r = self.sample_rate_hz?;
        (r >= 1.0 && r.fract() == 0.0).then_some(r as u32)
    }
}

/// The session, as an export needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SessionRow {
    user_id: Uuid,
    status: String,
    exercise: String,
    started_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    feedback: Option<serde_json::Value>,
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Request {
    /// The session.
    pub session: Uuid,
    /// In which format.
    pub format: Format,
    /// Only this data type (default: every one the format holds).
    pub data_type: Option<String>,
    /// Put the person's name, sex and birth date in the EDF+ patient field instead of a
    /// pseudonymous code: only for the person's own export.
    pub identify: bool,
}

/// Reads sessions from Postgres and points from ClickHouse for exports.
#[derive(Clone)]
pub struct Exporter {
    accounts: Accounts,
    clickhouse: clickhouse::Client,
}

#[derive(Debug, Row, Deserialize)]
struct Sample {
    t_us: i64,
    values: Vec<f32>,
}

const POINTS_OF: &str =
    "FROM points FINAL WHERE user_id = toUUID(?) AND session_id = toUUID(?) AND data_type = ?";

/// One file of the export.
#[derive(Debug, Clone)]
enum Part {
    Csv(DataType),
    Rr(DataType),
    Edf(DataType, Box<edf::Layout>),
}

impl Part {
    fn data_type(&self) -> &DataType {
        match self {
            Part::Csv(d) | Part::Rr(d) | Part::Edf(d, _) => d,
        }
    }
}

/// An export checked and planned, ready to stream.
#[derive(Clone)]
pub struct Prepared {
    exporter: Exporter,
    user: Uuid,
    session: Uuid,
    parts: Vec<Part>,
    format: Format,
}

impl Exporter {
    /// An exporter reading through `accounts` and `clickhouse` (whose database is biofeed's).
    pub fn new(accounts: Accounts, clickhouse: clickhouse::Client) -> Self {
        Self {
            accounts,
            clickhouse,
        }
    }

    /// Checks the request against the session and plans the files; refuses before anything is
    /// sent. Whether the caller may read the session is the caller's to decide first.
    pub async fn prepare(&self, request: &Request) -> Result<Prepared, ExportError> {
        let session: SessionRow = sqlx::query_as(
            "SELECT s.user_id, s.status, e.name AS exercise, s.started_at, s.ended_at, s.feedback
             FROM sessions s JOIN exercises e ON e.id = s.exercise_id WHERE s.id = $1",
        )
        .bind(request.session)
        .fetch_optional(&self.accounts.pool)
        .await?
        .ok_or(ExportError::NotFound)?;
        match session.status.as_str() {
            "completed" => {}
            "open" => {
                return Err(ExportError::NotExportable(
                    "the session is still open: it can be exported once it completed".to_owned(),
                ))
            }
            "purged" => {
                return Err(ExportError::NotExportable(
                    "the session was purged: its points were deleted".to_owned(),
                ))
            }
            other => {
                return Err(ExportError::NotExportable(format!(
                    "the session is {other}: only completed sessions are exported"
                )))
            }
        }
        let streamed: Vec<DataType> = sqlx::query_as(
            "SELECT d.name, d.unit, d.sample_rate_hz, d.min_value, d.max_value,
                    coalesce(d.metadata -> 'channels', '[]'::jsonb) AS labels
             FROM session_data_types sd JOIN data_types d ON d.id = sd.data_type_id
             WHERE sd.session_id = $1 ORDER BY d.name",
        )
        .bind(request.session)
        .fetch_all(&self.accounts.pool)
        .await?;
        let names = || {
            streamed
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let chosen: Vec<DataType> = match &request.data_type {
            Some(name) => {
                let d = streamed.iter().find(|d| &d.name == name).ok_or_else(|| {
                    ExportError::Unsupported {
                        field: "data_type",
                        reason: format!("the session streamed no {name}; it streamed {}", names()),
                    }
                })?;
                if let Some(reason) = cannot_hold(request.format, d) {
                    return Err(ExportError::Unsupported {
                        field: "format",
                        reason,
                    });
                }
                vec![d.clone()]
            }
            None => {
                let fit: Vec<DataType> = streamed
                    .iter()
                    .filter(|d| cannot_hold(request.format, d).is_none())
                    .cloned()
                    .collect();
                if fit.is_empty() {
                    let reason = match streamed.first() {
                        Some(d) if streamed.len() == 1 => {
                            cannot_hold(request.format, d).unwrap_or_default()
                        }
                        _ => format!(
                            "none of the session's data types ({}) fits this format",
                            names()
                        ),
                    };
                    return Err(ExportError::Unsupported {
                        field: "format",
                        reason,
                    });
                }
                fit
            }
        };
        let patient = if request.format == Format::Edf {
            Some(self.patient(session.user_id, request.identify).await?)
        } else {
            None
        };
        let mut parts = Vec::with_capacity(chosen.len());
        let mut empty = Vec::new();
        for d in chosen {
            parts.push(match request.format {
                Format::Csv => Part::Csv(d),
                Format::Rr => Part::Rr(d),
                Format::Edf => {
                    let layout = self
                        .edf_layout(
                            request.session,
                            &session,
                            &d,
                            patient.clone().unwrap_or_default(),
                        )
                        .await;
                    match layout {
                        Ok(layout) => Part::Edf(d, Box::new(layout)),
                        // A declared data type without samples is left out unless asked for.
                        Err(ExportError::Unsupported {
                            field: "data_type", ..
                        }) if request.data_type.is_none() => {
                            empty.push(d.name);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
        }
        if parts.is_empty() {
            return Err(ExportError::Unsupported {
                field: "data_type",
                reason: format!("the session holds no samples of {}", empty.join(", ")),
            });
        }
        // The points store must answer before anything is sent.
        if request.format != Format::Edf {
            self.clickhouse.query("SELECT 1").fetch_one::<u8>().await?;
        }
        Ok(Prepared {
            exporter: self.clone(),
            user: session.user_id,
            session: request.session,
            parts,
            format: request.format,
        })
    }

    /// The EDF+ patient field: a pseudonymous code, or the person's own details.
    async fn patient(&self, user: Uuid, identify: bool) -> Result<String, ExportError> {
        let code = biofeed_accounts::export::participant_label(&self.accounts, user);
        if !identify {
            return Ok(format!("{code} X X X"));
        }
        let profile = users::profile(&self.accounts, user).await?;
        let f = profile.fields;
        let sex = match f.gender.as_deref().map(str::to_lowercase).as_deref() {
            Some("female" | "f") => "F",
            Some("male" | "m") => "M",
            _ => "X",
        };
        let birth = f
            .birth_date
            .map(|d| d.format("%d-%b-%Y").to_string().to_uppercase())
            .unwrap_or_else(|| "X".to_owned());
        let name = [f.first_name, f.last_name]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        let name = if name.trim().is_empty() {
            "X".to_owned()
        } else {
            name.split_whitespace().collect::<Vec<_>>().join("_")
        };
        Ok(format!("{code} {sex} {birth} {name}"))
    }

    /// Plans an EDF+ file of `d`: where its records start, how many there are, whether any
    /// second is missing.
    async fn edf_layout(
        &self,
        session: Uuid,
        row: &SessionRow,
        d: &DataType,
        patient: String,
    ) -> Result<edf::Layout, ExportError> {
        let rate = d.whole_rate().ok_or_else(|| ExportError::Unsupported {
            field: "format",
            reason: format!("{} has no whole-Hz sample rate", d.name),
        })?;
        let (count, first, last): (u64, i64, i64) = self
            .clickhouse
            .query(&format!("SELECT count(), min(t_us), max(t_us) {POINTS_OF}"))
            .bind(row.user_id.to_string())
            .bind(session.to_string())
            .bind(&d.name)
            .fetch_one()
            .await?;
        if count == 0 {
            return Err(ExportError::Unsupported {
                field: "data_type",
                reason: format!("the session holds no samples of {}", d.name),
            });
        }
        // Records of one second from the first sample; the header's start is its second.
        let start_us = first.div_euclid(1_000_000) * 1_000_000;
        let record_seconds = 1;
        let spr = i64::from(rate * record_seconds);
        let present: u64 = self
            .clickhouse
            .query(&format!(
                "SELECT uniqExact(intDiv(intDiv((t_us - ?) * ? + 500000, 1000000), ?)) {POINTS_OF} AND t_us <= ?"
            ))
            .bind(first)
            .bind(i64::from(rate))
            .bind(spr)
            .bind(row.user_id.to_string())
            .bind(session.to_string())
            .bind(&d.name)
            .bind(last)
            .fetch_one()
            .await?;
        let last_slot = edf::Records::slot(first, rate, last);
        if count > (last_slot + 1) as u64 {
            return Err(ExportError::Unsupported {
                field: "format",
                reason: format!(
                    "the session's {} samples are denser than the data type's {rate} Hz: export them as csv",
                    d.name
                ),
            });
        }
        let start = DateTime::from_timestamp_micros(start_us)
            .ok_or_else(|| ExportError::Write(format!("sample time {first} out of range")))?;
        let onset = |t: DateTime<Utc>| t.timestamp_micros() - start_us;
        let mut annotations = vec![
            edf::Annotation {
                onset_us: onset(row.started_at),
                text: "session start".to_owned(),
            },
            edf::Annotation {
                onset_us: onset(row.started_at),
                text: format!("exercise {}", row.exercise),
            },
        ];
        if let Some(ended) = row.ended_at {
            annotations.push(edf::Annotation {
                onset_us: onset(ended),
                text: "session end".to_owned(),
            });
            // The person's ratings: numbers and yes/no under plain keys only (free text, in a
            // value or a key, may name people), at most 16 of them.
            if let Some(serde_json::Value::Object(fields)) = &row.feedback {
                let plain = |key: &str| {
                    (1..=32).contains(&key.len())
                        && key
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                };
                for (key, value) in fields
                    .iter()
                    .filter(|(k, v)| plain(k) && (v.is_number() || v.is_boolean()))
                    .take(16)
                {
                    {
                        annotations.push(edf::Annotation {
                            onset_us: onset(ended),
                            text: format!("feedback {key}={value}"),
                        });
                    }
                }
            }
        }
        let kind = signal_kind(&d.name);
        let dimension = ascii_unit(&d.unit);
        let signals = (0..d.labels.len().max(1))
            .map(|i| edf::Signal {
                label: format!(
                    "{kind} {}",
                    d.labels.get(i).map(String::as_str).unwrap_or("ch")
                ),
                dimension: dimension.clone(),
                physical_min: f64::from(d.min_value),
                physical_max: f64::from(d.max_value),
            })
            .collect();
        Ok(edf::Layout {
            patient,
            recording: format!(
                "Startdate {} X X biofeed",
                start.format("%d-%b-%Y").to_string().to_uppercase()
            ),
            start,
            first_us: first,
            last_us: last,
            rate_hz: rate,
            record_seconds,
            records: present,
            continuous: present == (last_slot / spr + 1) as u64,
            signals,
            annotations,
        })
    }
}

/// Why `format` cannot hold `d`, if it cannot.
fn cannot_hold(format: Format, d: &DataType) -> Option<String> {
    match format {
        Format::Csv => None,
        Format::Rr if d.name == "rr_interval" => None,
        Format::Rr => Some(format!(
            "rr holds RR intervals and {} is not rr_interval: export it as csv{}",
            d.name,
            if d.whole_rate().is_some() { " or edf" } else { "" }
        )),
        Format::Edf if d.whole_rate().is_some() => None,
        Format::Edf => Some(format!(
            "{} is an event stream, not a sampled signal, and EDF holds sampled signals: export it as {}",
            d.name,
            if d.name == "rr_interval" { "rr or csv" } else { "csv" }
        )),
    }
}

/// The EDF+ signal type prefix of a data type (its label is `<type> <channel>`).
fn signal_kind(name: &str) -> String {
    match name {
        "eeg" => "EEG",
        "ecg" => "ECG",
        "ppg" => "PPG",
        "respiration" => "Resp",
        "eda" => "EDA",
        "skin_temperature" => "Temp",
        "heart_rate" => "HR",
        "spo2" => "SpO2",
        other => return other.to_uppercase(),
    }
    .to_owned()
}

/// A unit in EDF's ASCII: `µV` → `uV`, `°C` → `degC`.
fn ascii_unit(unit: &str) -> String {
    unit.replace('µ', "u").replace('°', "deg")
}

/// Bytes written and not yet sent, shared by the writers (a zip writer owns its output).
#[derive(Clone, Default)]
struct Pending(Arc<Mutex<Vec<u8>>>);

impl Pending {
    fn take_if(&self, at_least: usize) -> Option<Vec<u8>> {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (buf.len() >= at_least && !buf.is_empty()).then(|| std::mem::take(&mut *buf))
    }
}

impl Write for Pending {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends what is pending once there is a chunk of it (everything with `at_least` 0).
async fn send(
    pending: &Pending,
    at_least: usize,
    out: &mpsc::Sender<Vec<u8>>,
) -> Result<(), ExportError> {
    if let Some(chunk) = pending.take_if(at_least) {
        out.send(chunk).await.map_err(|_| ExportError::Closed)?;
    }
    Ok(())
}

impl Prepared {
    /// Whose session it is.
    pub fn owner(&self) -> Uuid {
        self.user
    }

    /// The format's name: `csv`, `edf` or `rr`.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            Format::Csv => "csv",
            Format::Edf => "edf",
            Format::Rr => "rr",
        }
    }

    /// The file's name, e.g. `<session>_eeg.edf`, or `<session>.zip` for several.
    pub fn filename(&self) -> String {
        match self.parts.as_slice() {
            [one] => self.part_name(one),
            _ => format!("{}.zip", self.session),
        }
    }

    fn part_name(&self, part: &Part) -> String {
        match part {
            Part::Rr(_) => format!("{}_rr.txt", self.session),
            _ => format!(
                "{}_{}.{}",
                self.session,
                part.data_type().name,
                self.format.extension()
            ),
        }
    }

    /// The content type.
    pub fn content_type(&self) -> &'static str {
        match self.parts.as_slice() {
            [_] => self.format.content_type(),
            _ => "application/zip",
        }
    }

    /// The length in bytes, where known beforehand (a single EDF+ file).
    pub fn content_length(&self) -> Option<u64> {
        match self.parts.as_slice() {
            [Part::Edf(_, layout)] => Some(layout.file_bytes()),
            _ => None,
        }
    }

    /// Streams the export into `out` in chunks; the bytes written. On an error the export is
    /// incomplete and the caller must make that visible (abort the transfer, remove the file).
    pub async fn write(&self, out: mpsc::Sender<Vec<u8>>) -> Result<u64, ExportError> {
        let pending = Pending::default();
        let mut total = 0u64;
        if let [part] = self.parts.as_slice() {
            let mut w = pending.clone();
            self.write_part(part, &mut w, &pending, &out, &mut total)
                .await?;
        } else {
            let mut zip = zip::ZipWriter::new_stream(pending.clone());
            for part in &self.parts {
                let options = zip::write::SimpleFileOptions::default()
                    .compression_method(match part {
                        Part::Edf(..) => zip::CompressionMethod::Stored,
                        _ => zip::CompressionMethod::Deflated,
                    })
                    .large_file(true);
                zip.start_file(self.part_name(part), options)
                    .map_err(|e| ExportError::Write(e.to_string()))?;
                self.write_part(part, &mut zip, &pending, &out, &mut total)
                    .await?;
            }
            zip.finish()
                .map_err(|e| ExportError::Write(e.to_string()))?;
        }
        if let Some(chunk) = pending.take_if(0) {
            total += chunk.len() as u64;
            out.send(chunk).await.map_err(|_| ExportError::Closed)?;
        }
        Ok(total)
    }

    pub(crate) async fn write_part<W: Write>(
        &self,
        part: &Part,
        w: &mut W,
        pending: &Pending,
        out: &mpsc::Sender<Vec<u8>>,
        total: &mut u64,
    ) -> Result<(), ExportError> {
        let d = part.data_type();
        // An EDF+ file reads only the samples its layout was made for.
        let until = match part {
            Part::Edf(_, layout) => layout.last_us,
            _ => i64::MAX,
        };
        let mut cursor = self
            .exporter
            .clickhouse
            .query(&format!(
                "SELECT t_us, values {POINTS_OF} AND t_us <= ? ORDER BY t_us"
            ))
            .bind(self.user.to_string())
            .bind(self.session.to_string())
            .bind(&d.name)
            .bind(until)
            .fetch::<Sample>()?;
        let mut flush = |pending: &Pending| -> Option<Vec<u8>> {
            let chunk = pending.take_if(CHUNK)?;
            *total += chunk.len() as u64;
            Some(chunk)
        };
        match part {
            Part::Csv(d) => {
                let mut csv = csv::Writer::from_writer(&mut *w);
                let mut header = vec!["time".to_owned(), "time_us".to_owned()];
                for label in &d.labels {
                    header.push(format!("{label} ({})", d.unit));
                }
                csv.write_record(&header).map_err(csv_error)?;
                let mut row: Vec<String> = Vec::with_capacity(header.len());
                while let Some(s) = cursor.next().await? {
                    row.clear();
                    row.push(iso_time(s.t_us));
                    row.push(s.t_us.to_string());
                    row.extend(s.values.iter().map(f32::to_string));
                    csv.write_record(&row).map_err(csv_error)?;
                    if pending.0.lock().map(|b| b.len()).unwrap_or(0) >= CHUNK {
                        csv.flush()?;
                    }
                    if let Some(chunk) = flush(pending) {
                        out.send(chunk).await.map_err(|_| ExportError::Closed)?;
                    }
                }
                csv.flush()?;
            }
            Part::Rr(_) => {
                let mut line = String::new();
                while let Some(s) = cursor.next().await? {
                    line.clear();
                    if let Some(rr) = s.values.first() {
                        line.push_str(&rr.to_string());
                        line.push('\n');
                        w.write_all(line.as_bytes())?;
                    }
                    if let Some(chunk) = flush(pending) {
                        out.send(chunk).await.map_err(|_| ExportError::Closed)?;
                    }
                }
            }
            Part::Edf(_, layout) => {
                w.write_all(&layout.header())?;
                let mut records = edf::Records::new((**layout).clone());
                let mut bytes = Vec::with_capacity(CHUNK + layout.record_bytes());
                while let Some(s) = cursor.next().await? {
                    records
                        .push(s.t_us, &s.values, &mut bytes)
                        .map_err(ExportError::Write)?;
                    if bytes.len() >= CHUNK {
                        w.write_all(&bytes)?;
                        bytes.clear();
                        if let Some(chunk) = flush(pending) {
                            out.send(chunk).await.map_err(|_| ExportError::Closed)?;
                        }
                    }
                }
                let collisions = records.collisions;
                let written = records.finish(&mut bytes).map_err(ExportError::Write)?;
                w.write_all(&bytes)?;
                if written != layout.records {
                    return Err(ExportError::Write(format!(
                        "{} of {} EDF records: the points changed while they were exported",
                        written, layout.records
                    )));
                }
                if collisions > 0 {
                    tracing::warn!(session_id = %self.session, data_type = %d.name, collisions, "samples closer than the data type's rate: the later of two kept");
                }
            }
        }
        w.flush()?;
        send(pending, CHUNK, out).await
    }
}

fn csv_error(e: csv::Error) -> ExportError {
    ExportError::Write(e.to_string())
}

/// ISO 8601 UTC with microseconds.
fn iso_time(t_us: i64) -> String {
    DateTime::from_timestamp_micros(t_us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_type(name: &str, rate: Option<f32>) -> DataType {
        DataType {
            name: name.to_owned(),
            unit: "µV".to_owned(),
            sample_rate_hz: rate,
            min_value: -2000.0,
            max_value: 2000.0,
            labels: vec!["Fp1".to_owned()],
        }
    }

    #[test]
    fn each_format_says_which_data_types_it_cannot_hold() {
        let rr = data_type("rr_interval", None);
        let eeg = data_type("eeg", Some(256.0));
        assert!(cannot_hold(Format::Csv, &rr).is_none());
        assert!(cannot_hold(Format::Rr, &rr).is_none());
        assert!(cannot_hold(Format::Edf, &eeg).is_none());
        let rr_of_eeg = cannot_hold(Format::Rr, &eeg).unwrap();
        assert!(rr_of_eeg.contains("eeg is not rr_interval"), "{rr_of_eeg}");
        let edf_of_rr = cannot_hold(Format::Edf, &rr).unwrap();
        assert!(edf_of_rr.contains("event stream"), "{edf_of_rr}");
        assert!(matches!(
            Format::parse("xlsx"),
            Err(ExportError::Unsupported {
                field: "format",
                ..
            })
        ));
    }

    #[test]
    fn times_and_units_are_written_as_tools_expect() {
        assert_eq!(
            iso_time(1_764_000_000_000_001),
            "2025-11-24T16:00:00.000001Z"
        );
        assert_eq!(ascii_unit("µV"), "uV");
        assert_eq!(ascii_unit("°C"), "degC");
        assert_eq!(signal_kind("respiration"), "Resp");
    }
}

/// What a person-level bundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// Every completed session's files in this format, a folder per session.
    Files(Format),
    /// The EEG sessions as a BIDS dataset (BIDS-EEG: EDF+ and its sidecars).
    Bids,
}

impl BundleFormat {
    /// Every bundle format, as the query string names them.
    pub const NAMES: &'static str = "csv, edf, rr, bids";

    /// The bundle format named `name`.
    pub fn parse(name: &str) -> Result<Self, ExportError> {
        match name {
            "bids" => Ok(Self::Bids),
            other => Format::parse(other)
                .map(Self::Files)
                .map_err(|_| ExportError::Unsupported {
                    field: "format",
                    reason: format!("unknown format '{other}': one of {}", Self::NAMES),
                }),
        }
    }

    /// The format's name: `csv`, `edf`, `rr` or `bids`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Files(Format::Csv) => "csv",
            Self::Files(Format::Edf) => "edf",
            Self::Files(Format::Rr) => "rr",
            Self::Bids => "bids",
        }
    }

    /// Whether a data type named `name` at `rate` goes into the bundle.
    fn holds(self, name: &str, rate: Option<f32>) -> bool {
        let d = DataType {
            name: name.to_owned(),
            unit: String::new(),
            sample_rate_hz: rate,
            min_value: 0.0,
            max_value: 1.0,
            labels: Vec::new(),
        };
        match self {
            Self::Files(format) => cannot_hold(format, &d).is_none(),
            Self::Bids => name == "eeg" && d.whole_rate().is_some(),
        }
    }
}

/// One session of a bundle.
#[derive(Debug, Clone, sqlx::FromRow)]
struct BundledSession {
    user_id: Uuid,
    session_id: Uuid,
    started_at: DateTime<Utc>,
    exercise: String,
    data_type: String,
    sample_rate_hz: Option<f32>,
}

/// A person in a bundle: their id, pseudonymous label, and sessions (id, start, exercise) in
/// time order.
type BundledPerson = (Uuid, String, Vec<(Uuid, DateTime<Utc>, String)>);

/// A person-level export, checked: a zip of their completed sessions.
#[derive(Clone)]
pub struct Bundle {
    exporter: Exporter,
    format: BundleFormat,
    /// Per person (by participant label), their sessions in time order.
    people: Vec<BundledPerson>,
}

impl Exporter {
    /// Plans a zip of every completed session of `users` in `format` (each person a folder,
    /// named by their pseudonymous label); 409 when none holds data the format can hold.
    pub async fn prepare_bundle(
        &self,
        users: &[Uuid],
        format: BundleFormat,
    ) -> Result<Bundle, ExportError> {
        let rows: Vec<BundledSession> = sqlx::query_as(
            "SELECT s.user_id, s.id AS session_id, s.started_at, e.name AS exercise,
                    d.name AS data_type, d.sample_rate_hz
             FROM sessions s JOIN exercises e ON e.id = s.exercise_id
             JOIN session_data_types sd ON sd.session_id = s.id
             JOIN data_types d ON d.id = sd.data_type_id
             WHERE s.user_id = ANY($1) AND s.status = 'completed'
             ORDER BY s.user_id, s.started_at, s.id",
        )
        .bind(users)
        .fetch_all(&self.accounts.pool)
        .await?;
        let mut people: Vec<BundledPerson> = Vec::new();
        for row in rows
            .into_iter()
            .filter(|r| format.holds(&r.data_type, r.sample_rate_hz))
        {
            if people.last().is_none_or(|p| p.0 != row.user_id) {
                let label =
                    biofeed_accounts::export::participant_label(&self.accounts, row.user_id);
                people.push((row.user_id, label, Vec::new()));
            }
            if let Some((_, _, sessions)) = people.last_mut() {
                if sessions.last().is_none_or(|s| s.0 != row.session_id) {
                    sessions.push((row.session_id, row.started_at, row.exercise));
                }
            }
        }
        if people.is_empty() {
            return Err(ExportError::NotExportable(match format {
                BundleFormat::Bids => {
                    "no completed EEG session to put in a BIDS dataset".to_owned()
                }
                BundleFormat::Files(_) => {
                    "no completed session holds data this format can hold".to_owned()
                }
            }));
        }
        self.clickhouse.query("SELECT 1").fetch_one::<u8>().await?;
        Ok(Bundle {
            exporter: self.clone(),
            format,
            people,
        })
    }
}

impl Exporter {
    /// Plans a BIDS dataset of one completed EEG session (its person as the one participant),
    /// refusing as [`Exporter::prepare`] does.
    pub async fn prepare_session_bids(&self, session: Uuid) -> Result<Bundle, ExportError> {
        let request = Request {
            session,
            format: Format::Edf,
            data_type: Some("eeg".to_owned()),
            identify: false,
        };
        let prepared = self.prepare(&request).await.map_err(|e| match e {
            ExportError::Unsupported { reason, .. } => ExportError::Unsupported {
                field: "format",
                reason: format!("a BIDS dataset holds EEG recordings: {reason}"),
            },
            other => other,
        })?;
        let (started_at, exercise): (DateTime<Utc>, String) = sqlx::query_as(
            "SELECT s.started_at, e.name FROM sessions s JOIN exercises e ON e.id = s.exercise_id
             WHERE s.id = $1",
        )
        .bind(session)
        .fetch_optional(&self.accounts.pool)
        .await?
        .ok_or(ExportError::NotFound)?;
        let label = biofeed_accounts::export::participant_label(&self.accounts, prepared.user);
        Ok(Bundle {
            exporter: self.clone(),
            format: BundleFormat::Bids,
            people: vec![(prepared.user, label, vec![(session, started_at, exercise)])],
        })
    }
}

impl Bundle {
    /// The zip's name.
    pub fn filename(&self) -> String {
        match (self.format, self.people.as_slice()) {
            (BundleFormat::Bids, _) => "biofeed-bids.zip".to_owned(),
            (_, [(_, label, _)]) => format!("biofeed-{label}.zip"),
            _ => "biofeed-export.zip".to_owned(),
        }
    }

    /// Whose sessions it holds.
    pub fn people(&self) -> Vec<Uuid> {
        self.people.iter().map(|p| p.0).collect()
    }

    /// How many sessions it holds.
    pub fn sessions(&self) -> usize {
        self.people.iter().map(|p| p.2.len()).sum()
    }

    /// Streams the zip into `out` (see [`Prepared::write`] for a failure midway).
    pub async fn write(&self, out: mpsc::Sender<Vec<u8>>) -> Result<u64, ExportError> {
        let pending = Pending::default();
        let mut total = 0u64;
        let mut zip = zip::ZipWriter::new_stream(pending.clone());
        let text = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let zip_error = |e: zip::result::ZipError| ExportError::Write(e.to_string());
        if self.format == BundleFormat::Bids {
            zip.start_file("dataset_description.json", text)
                .map_err(zip_error)?;
            zip.write_all(
                serde_json::to_string_pretty(&serde_json::json!({
                    "Name": "biofeed EEG sessions",
                    "BIDSVersion": "1.9.0",
                    "DatasetType": "raw",
                    "GeneratedBy": [{ "Name": "biofeed", "Version": env!("CARGO_PKG_VERSION") }],
                }))
                .unwrap_or_default()
                .as_bytes(),
            )?;
            zip.start_file("README", text).map_err(zip_error)?;
            zip.write_all(
                b"EEG sessions exported by biofeed. Participants are pseudonymous codes; sessions are labelled by their start (UTC). \
                  Recordings are EDF+ (EDF+D where seconds are missing).\n",
            )?;
        }
        // participants.tsv lists who has a recording in the dataset: written last.
        let mut participants = "participant_id\n".to_owned();
        for (user, label, sessions) in &self.people {
            let mut used: Vec<String> = Vec::new();
            for (session, started_at, exercise) in sessions {
                let request = Request {
                    session: *session,
                    format: match self.format {
                        BundleFormat::Files(f) => f,
                        BundleFormat::Bids => Format::Edf,
                    },
                    data_type: (self.format == BundleFormat::Bids).then(|| "eeg".to_owned()),
                    identify: false,
                };
                let prepared = match self.exporter.prepare(&request).await {
                    Ok(p) => p,
                    // A session with nothing of the format (e.g. no samples stored) is left out.
                    Err(
                        ExportError::Unsupported { reason, .. }
                        | ExportError::NotExportable(reason),
                    ) => {
                        tracing::info!(session_id = %session, %reason, "session left out of the bundle");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                debug_assert_eq!(prepared.user, *user);
                for part in &prepared.parts {
                    match (self.format, part) {
                        (BundleFormat::Bids, Part::Edf(d, layout)) => {
                            let mut ses = started_at.format("%Y%m%dT%H%M%S").to_string();
                            while used.contains(&ses) {
                                ses.push('b');
                            }
                            used.push(ses.clone());
                            let mut task: String = exercise
                                .chars()
                                .filter(char::is_ascii_alphanumeric)
                                .collect();
                            if task.is_empty() {
                                task = "exercise".to_owned();
                            }
                            if used.len() == 1 {
                                participants.push_str(&format!("sub-{label}\n"));
                            }
                            let stem = format!(
                                "sub-{label}/ses-{ses}/eeg/sub-{label}_ses-{ses}_task-{task}"
                            );
                            zip.start_file(format!("{stem}_eeg.edf"), stored)
                                .map_err(zip_error)?;
                            prepared
                                .write_part(part, &mut zip, &pending, &out, &mut total)
                                .await?;
                            zip.start_file(format!("{stem}_eeg.json"), text)
                                .map_err(zip_error)?;
                            zip.write_all(bids_sidecar(&task, d, layout).as_bytes())?;
                            zip.start_file(format!("{stem}_channels.tsv"), text)
                                .map_err(zip_error)?;
                            zip.write_all(bids_channels(d).as_bytes())?;
                            zip.start_file(format!("{stem}_events.tsv"), text)
                                .map_err(zip_error)?;
                            zip.write_all(bids_events(layout).as_bytes())?;
                        }
                        (BundleFormat::Bids, _) => {}
                        (BundleFormat::Files(_), part) => {
                            zip.start_file(
                                format!("{label}/{}", prepared.part_name(part)),
                                if matches!(part, Part::Edf(..)) {
                                    stored
                                } else {
                                    text
                                },
                            )
                            .map_err(zip_error)?;
                            prepared
                                .write_part(part, &mut zip, &pending, &out, &mut total)
                                .await?;
                        }
                    }
                }
            }
        }
        if self.format == BundleFormat::Bids {
            zip.start_file("participants.tsv", text)
                .map_err(zip_error)?;
            zip.write_all(participants.as_bytes())?;
        }
        zip.finish().map_err(zip_error)?;
        if let Some(chunk) = pending.take_if(0) {
            total += chunk.len() as u64;
            out.send(chunk).await.map_err(|_| ExportError::Closed)?;
        }
        Ok(total)
    }
}

/// The BIDS-EEG sidecar (`*_eeg.json`) of a recording.
fn bids_sidecar(task: &str, d: &DataType, layout: &edf::Layout) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "TaskName": task,
        "SamplingFrequency": layout.rate_hz,
        "EEGChannelCount": layout.signals.len(),
        "EEGReference": "n/a",
        "PowerLineFrequency": "n/a",
        "SoftwareFilters": "n/a",
        "RecordingType": if layout.continuous { "continuous" } else { "discontinuous" },
        "RecordingDuration": layout.records * u64::from(layout.record_seconds),
        "Manufacturer": "n/a",
        "EEGPlacementScheme": if d.labels.iter().any(|l| l == "Fp1") { "10-20" } else { "n/a" },
    }))
    .unwrap_or_default()
}

/// `*_channels.tsv`: one row per channel.
fn bids_channels(d: &DataType) -> String {
    let mut tsv = "name\ttype\tunits\n".to_owned();
    for label in &d.labels {
        tsv.push_str(&format!("{}\tEEG\t{}\n", label, d.unit));
    }
    tsv
}

/// `*_events.tsv`: the session's annotations, onsets in seconds from the recording's start.
fn bids_events(layout: &edf::Layout) -> String {
    let mut tsv = "onset\tduration\ttrial_type\n".to_owned();
    for a in &layout.annotations {
        let text: String = a
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        tsv.push_str(&format!("{:.6}\t0\t{text}\n", a.onset_us as f64 / 1e6));
    }
    tsv
}
