//! EDF+ (European Data Format, <https://www.edfplus.info/specs/edfplus.html>), written as a
//! stream: the header first (its size and the number of data records are known beforehand, so
//! the file's length is too), then one data record at a time.
//!
//! One file holds one data type: a signal per channel, all at the data type's (whole-Hz) rate,
//! and the `EDF Annotations` signal. Data records last one second from the first sample (the
//! header's start is that sample's second; the first record's time-keeping annotation gives the
//! fraction, e.g. `+0.25`). A sample goes to the slot its time rounds to; a record in which no
//! sample fell is left out and the file is EDF+D (discontinuous), each record saying its start
//! in its time-keeping annotation. Slots of a written record that no sample filled (a gap inside
//! a second) hold the channel's previous value.
//!
//! Rust's EDF crates (edfplus 0.1, edf-rs 0.x) write to seekable files only and neither writes
//! EDF+D, so the format is written here: fixed-width ASCII header fields and 16-bit samples.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// The 16-bit digital range every signal uses.
pub const DIGITAL_MIN: i32 = -32768;
/// See [`DIGITAL_MIN`].
pub const DIGITAL_MAX: i32 = 32767;

/// One signal (a channel of the data type).
#[derive(Debug, Clone)]
pub struct Signal {
    /// E.g. `EEG Fp1` (at most 16 characters).
    pub label: String,
    /// E.g. `uV` (at most 8 ASCII characters).
    pub dimension: String,
    /// The smallest value the data type allows.
    pub physical_min: f64,
    /// The largest value the data type allows.
    pub physical_max: f64,
}

/// An annotation: an onset relative to the file's start, and a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Seconds after the file's start (negative before it).
    pub onset_us: i64,
    /// What happened (no control characters).
    pub text: String,
}

/// Everything the header says, known before the first sample is written.
#[derive(Debug, Clone)]
pub struct Layout {
    /// EDF+ patient field: `code sex birthdate name`, `X` where unknown.
    pub patient: String,
    /// EDF+ recording field: `Startdate dd-MMM-yyyy admincode technician equipment`.
    pub recording: String,
    /// The file's start as the header gives it: the first sample's second.
    pub start: DateTime<Utc>,
    /// The first record's start, µs since the epoch: the first sample's time.
    pub first_us: i64,
    /// The last sample's time when the layout was made: later ones are not read.
    pub last_us: i64,
    /// Samples per second of every signal.
    pub rate_hz: u32,
    /// Seconds per data record.
    pub record_seconds: u32,
    /// The data records written (those in which a sample fell).
    pub records: u64,
    /// Whether every record from the first to the last is written (EDF+C) or some are left out
    /// (EDF+D).
    pub continuous: bool,
    /// One per channel.
    pub signals: Vec<Signal>,
    /// The annotations, all in the first record.
    pub annotations: Vec<Annotation>,
}

impl Layout {
    /// Samples per signal in a data record.
    pub fn samples_per_record(&self) -> usize {
        (self.rate_hz * self.record_seconds) as usize
    }

    /// The first record's start, µs after the header's start (under a second).
    fn offset_us(&self) -> i64 {
        self.first_us - self.start.timestamp_micros()
    }

    /// Bytes of the annotation signal in each record: room for the first record's annotations.
    pub fn annotation_bytes(&self) -> usize {
        let first = tal_timekeeping(self.offset_us()).len()
            + self
                .annotations
                .iter()
                .map(|a| tal(a.onset_us, &a.text).len())
                .sum::<usize>();
        // Later records hold a time-keeping TAL only: 24 bytes hold onsets of 12 digits and 6
        // decimals.
        let bytes = first.max(24);
        bytes + bytes % 2
    }

    /// Bytes of one data record.
    pub fn record_bytes(&self) -> usize {
        self.signals.len() * self.samples_per_record() * 2 + self.annotation_bytes()
    }

    /// Bytes of the header.
    pub fn header_bytes(&self) -> usize {
        256 * (self.signals.len() + 2)
    }

    /// The whole file's length.
    pub fn file_bytes(&self) -> u64 {
        self.header_bytes() as u64 + self.records * self.record_bytes() as u64
    }

    /// The header, as written.
    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(self.header_bytes());
        let ns = self.signals.len() + 1;
        field(&mut h, "0", 8);
        field(&mut h, &self.patient, 80);
        field(&mut h, &self.recording, 80);
        let s = self.start;
        field(
            &mut h,
            &format!("{:02}.{:02}.{:02}", s.day(), s.month(), s.year() % 100),
            8,
        );
        field(
            &mut h,
            &format!("{:02}.{:02}.{:02}", s.hour(), s.minute(), s.second()),
            8,
        );
        field(&mut h, &self.header_bytes().to_string(), 8);
        field(&mut h, if self.continuous { "EDF+C" } else { "EDF+D" }, 44);
        field(&mut h, &self.records.to_string(), 8);
        field(&mut h, &self.record_seconds.to_string(), 8);
        field(&mut h, &ns.to_string(), 4);
        let annotation = Signal {
            label: "EDF Annotations".to_owned(),
            dimension: String::new(),
            physical_min: -1.0,
            physical_max: 1.0,
        };
        let all: Vec<&Signal> = self.signals.iter().chain([&annotation]).collect();
        let last = all.len() - 1;
        for s in &all {
            field(&mut h, &s.label, 16);
        }
        for _ in &all {
            field(&mut h, "", 80); // transducer
        }
        for s in &all {
            field(&mut h, &s.dimension, 8);
        }
        for s in &all {
            field(&mut h, &number(s.physical_min), 8);
        }
        for s in &all {
            field(&mut h, &number(s.physical_max), 8);
        }
        for _ in &all {
            field(&mut h, &DIGITAL_MIN.to_string(), 8);
        }
        for _ in &all {
            field(&mut h, &DIGITAL_MAX.to_string(), 8);
        }
        for _ in &all {
            field(&mut h, "", 80); // prefiltering: none applied
        }
        for (i, _) in all.iter().enumerate() {
            let n = if i == last {
                self.annotation_bytes() / 2
            } else {
                self.samples_per_record()
            };
            field(&mut h, &n.to_string(), 8);
        }
        for _ in &all {
            field(&mut h, "", 32);
        }
        h
    }

    /// The physical range as the header states it (what readers scale with).
    fn written_range(signal: &Signal) -> (f64, f64) {
        let parse = |v: f64| number(v).trim().parse::<f64>().unwrap_or(v);
        (parse(signal.physical_min), parse(signal.physical_max))
    }
}

/// A header field: ASCII, left-aligned, padded with spaces, cut at `width`.
fn field(out: &mut Vec<u8>, value: &str, width: usize) {
    let ascii: Vec<u8> = value
        .chars()
        .map(|c| {
            if (' '..='~').contains(&c) {
                c as u8
            } else {
                b'_'
            }
        })
        .take(width)
        .collect();
    out.extend_from_slice(&ascii);
    out.extend(std::iter::repeat_n(b' ', width - ascii.len()));
}

/// A number in at most 8 characters, as exact as fits.
pub fn number(v: f64) -> String {
    let plain = format!("{v}");
    if plain.len() <= 8 {
        return plain;
    }
    for decimals in (0..8).rev() {
        let s = format!("{v:.decimals$}");
        if s.len() <= 8 {
            return s;
        }
    }
    format!("{v:.0}")
}

/// Seconds as EDF+ onsets write them: a sign, then decimals without trailing zeros.
fn onset(us: i64) -> String {
    let sign = if us < 0 { '-' } else { '+' };
    let us = us.unsigned_abs();
    let (secs, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        format!("{sign}{secs}")
    } else {
        let f = format!("{frac:06}");
        format!("{sign}{secs}.{}", f.trim_end_matches('0'))
    }
}

/// A time-keeping TAL: the record's start, µs after the file's start.
fn tal_timekeeping(onset_us: i64) -> Vec<u8> {
    format!("{}\x14\x14\0", onset(onset_us)).into_bytes()
}

/// An annotation's TAL.
fn tal(onset_us: i64, text: &str) -> Vec<u8> {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{}\x14{clean}\x14\0", onset(onset_us)).into_bytes()
}

/// Writes the data records of a [`Layout`], fed with samples in time order.
pub struct Records {
    layout: Layout,
    start_us: i64,
    spr: usize,
    channels: usize,
    /// The record being filled, its index, and which of its slots a sample filled.
    current: Option<i64>,
    slots: Vec<i16>,
    filled: Vec<bool>,
    /// Each channel's last value (digital), held over slots no sample filled.
    last: Vec<i16>,
    /// Scale per channel: digital = (physical - offset) * gain, then rounded and clamped.
    scale: Vec<(f64, f64)>,
    written: u64,
    /// Samples that fell into an already filled slot (denser than the rate): the later kept.
    pub collisions: u64,
}

impl Records {
    /// Starts writing `layout`'s records.
    pub fn new(layout: Layout) -> Self {
        let spr = layout.samples_per_record();
        let channels = layout.signals.len();
        let scale = layout
            .signals
            .iter()
            .map(|s| {
                let (pmin, pmax) = Layout::written_range(s);
                let gain = f64::from(DIGITAL_MAX - DIGITAL_MIN) / (pmax - pmin);
                (pmin, gain)
            })
            .collect();
        Self {
            start_us: layout.first_us,
            spr,
            channels,
            current: None,
            slots: vec![0; spr * channels],
            filled: vec![false; spr],
            last: vec![0; channels],
            scale,
            written: 0,
            collisions: 0,
            layout,
        }
    }

    /// The slot a sample at `t_us` falls into: its time × rate, rounded.
    pub fn slot(start_us: i64, rate_hz: u32, t_us: i64) -> i64 {
        ((t_us - start_us) * i64::from(rate_hz) + 500_000).div_euclid(1_000_000)
    }

    fn digital(&self, channel: usize, v: f32) -> i16 {
        let (pmin, gain) = self.scale[channel];
        let d = ((f64::from(v) - pmin) * gain + f64::from(DIGITAL_MIN)).round();
        d.clamp(f64::from(DIGITAL_MIN), f64::from(DIGITAL_MAX)) as i16
    }

    /// Adds a sample, writing into `out` any record it completed; refuses a record beyond the
    /// planned number (the points changed since the layout was made).
    pub fn push(&mut self, t_us: i64, values: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
        let slot = Self::slot(self.start_us, self.layout.rate_hz, t_us).max(0);
        let spr = self.spr as i64;
        let (record, pos) = (slot / spr, (slot % spr) as usize);
        match self.current {
            Some(current) if current == record => {}
            Some(current) if record < current => {
                // Out of order (cannot happen with sorted input): keep it in the current record.
                self.collisions += 1;
                return Ok(());
            }
            Some(_) => {
                self.flush(out)?;
                self.current = Some(record);
            }
            None => self.current = Some(record),
        }
        if self.filled[pos] {
            self.collisions += 1;
        }
        self.filled[pos] = true;
        for c in 0..self.channels {
            let v = values.get(c).copied().unwrap_or(0.0);
            self.slots[c * self.spr + pos] = self.digital(c, v);
        }
        Ok(())
    }

    /// Writes the record being filled, if any.
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(record) = self.current.take() else {
            return Ok(());
        };
        if self.written >= self.layout.records {
            return Err(format!(
                "more than the {} data records planned: the points changed while they were exported",
                self.layout.records
            ));
        }
        // Slots no sample filled hold the previous value (the first filled one at the start of
        // the file).
        if let Some(first) = self.filled.iter().position(|f| *f) {
            if self.written == 0 {
                for c in 0..self.channels {
                    self.last[c] = self.slots[c * self.spr + first];
                }
            }
        }
        for pos in 0..self.spr {
            for c in 0..self.channels {
                let i = c * self.spr + pos;
                if self.filled[pos] {
                    self.last[c] = self.slots[i];
                } else {
                    self.slots[i] = self.last[c];
                }
            }
        }
        for v in &self.slots {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let mut annotations = tal_timekeeping(
            self.layout.offset_us() + record * i64::from(self.layout.record_seconds) * 1_000_000,
        );
        if self.written == 0 {
            for a in &self.layout.annotations {
                annotations.extend(tal(a.onset_us, &a.text));
            }
        }
        annotations.resize(self.layout.annotation_bytes(), 0);
        out.extend_from_slice(&annotations);
        self.filled.iter_mut().for_each(|f| *f = false);
        self.written += 1;
        Ok(())
    }

    /// Writes the last record; the number of records written.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<u64, String> {
        self.flush(out)?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(records: u64, continuous: bool) -> Layout {
        Layout {
            patient: "abc X X X".to_owned(),
            recording: "Startdate 26-NOV-2026 X X biofeed".to_owned(),
            start: DateTime::from_timestamp(1_764_000_000, 0).unwrap(),
            first_us: 1_764_000_000_000_000,
            last_us: 1_764_000_010_000_000,
            rate_hz: 4,
            record_seconds: 1,
            records,
            continuous,
            signals: vec![Signal {
                label: "EDA scl".to_owned(),
                dimension: "uS".to_owned(),
                physical_min: 0.0,
                physical_max: 100.0,
            }],
            annotations: vec![Annotation {
                onset_us: -500_000,
                text: "session start".to_owned(),
            }],
        }
    }

    #[test]
    fn the_header_has_the_fixed_layout_readers_expect() {
        let l = layout(3, true);
        let h = l.header();
        assert_eq!(h.len(), l.header_bytes());
        assert_eq!(&h[0..8], b"0       ");
        assert_eq!(&h[168..176], b"24.11.25");
        assert_eq!(&h[192..197], b"EDF+C");
        assert_eq!(&h[236..244], b"3       ");
        assert_eq!(&h[252..256], b"2   ");
        assert_eq!(&h[256..272], b"EDA scl         ");
        assert_eq!(&h[272..288], b"EDF Annotations ");
    }

    #[test]
    fn samples_land_in_their_slots_and_gaps_leave_records_out() {
        let l = layout(2, false);
        let start = l.start.timestamp_micros();
        let mut r = Records::new(l.clone());
        let mut out = Vec::new();
        for i in 0..4 {
            r.push(start + i * 250_000, &[50.0], &mut out).unwrap();
        }
        // Seconds 1 and 2 missing; second 3 has two of its four samples.
        r.push(start + 3_000_000, &[0.0], &mut out).unwrap();
        r.push(start + 3_500_000, &[100.0], &mut out).unwrap();
        assert_eq!(r.finish(&mut out).unwrap(), 2);
        assert_eq!(out.len(), 2 * l.record_bytes());
        let sample = |record: usize, pos: usize| {
            let at = record * l.record_bytes() + pos * 2;
            i16::from_le_bytes([out[at], out[at + 1]])
        };
        // 50 of 0..100 is the middle: -32768 + 32767.5, rounded.
        assert!([-1, 0].contains(&sample(0, 0)), "{}", sample(0, 0));
        assert_eq!(sample(1, 0), -32768);
        assert_eq!(sample(1, 1), -32768); // held
        assert_eq!(sample(1, 2), 32767);
        assert_eq!(sample(1, 3), 32767); // held
        let second = &out[l.record_bytes() + 8..2 * l.record_bytes()];
        assert!(second.starts_with(b"+3\x14\x14\0"), "{second:?}");
        let first = &out[8..l.record_bytes()];
        assert!(first.starts_with(b"+0\x14\x14\0-0.5\x14session start\x14\0"));
    }

    #[test]
    fn the_first_record_starts_at_the_first_sample_and_no_record_beyond_the_plan_is_written() {
        // The first sample 0.9 s into its second, at 1 Hz: record 0 holds it (EDF+C), its
        // time-keeping annotation says +0.9.
        let mut l = layout(2, true);
        l.rate_hz = 1;
        l.first_us += 900_000;
        let mut r = Records::new(l.clone());
        let mut out = Vec::new();
        r.push(l.first_us, &[1.0], &mut out).unwrap();
        r.push(l.first_us + 1_000_000, &[2.0], &mut out).unwrap();
        // A third second that appeared after the plan: refused, not written.
        let refused = r.push(l.first_us + 2_000_000, &[3.0], &mut out);
        assert!(refused.is_ok(), "the second record is only written now");
        assert_eq!(out.len(), 2 * l.record_bytes());
        assert!(out[2..].starts_with(b"+0.9\x14\x14\0"));
        assert!(r.finish(&mut out).unwrap_err().contains("more than the 2"));
    }

    #[test]
    fn numbers_fit_eight_characters() {
        assert_eq!(number(-2000.0), "-2000");
        assert_eq!(number(0.001_234_567_89), "0.001235");
        assert!(number(-123_456.789).len() <= 8);
        assert_eq!(onset(1_500_000), "+1.5");
        assert_eq!(onset(-250), "-0.00025");
    }
}
