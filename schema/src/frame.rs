//! The frame: one session's samples of one data type, and the newtypes it is made of.

use uuid::Uuid;

/// One session's samples of one data type, columnar.
///
/// Sample `i` was taken at `t0_us + offsets_us[i]` (µs since the Unix epoch, UTC); its value on
/// channel `c` is `values[i * channels + c]`. Columnar arrays encode and decode as tight loops
/// (a float is 4 raw bytes, an offset a 1–3 byte varint), where a record per sample would cost
/// a field header and a branch per value.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorFrame {
    /// Chosen by the device; a frame re-sent with the same id is the same frame.
    pub frame_id: Uuid,
    /// The session; also the Kafka key, which keeps a session's frames in order.
    pub session_id: Uuid,
    /// Pseudonymous id of the person measured.
    pub user_id: Uuid,
    /// The device that posted the frame.
    pub device_id: Uuid,
    /// The data type's name.
    pub data_type: DataTypeName,
    /// Values per sample.
    pub channels: u16,
    /// When the gateway received the frame, µs since the epoch.
    pub received_at_us: i64,
    /// Time of the first sample, µs since the epoch.
    pub t0_us: i64,
    /// Each sample's time minus `t0_us`.
    pub offsets_us: Vec<i64>,
    /// Sample-major values: `channels` per sample.
    pub values: Vec<f32>,
}

/// A frame whose parts do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame has no samples.
    #[error("the frame has no samples")]
    Empty,
    /// `channels` is zero.
    #[error("channels must be at least 1")]
    NoChannels,
    /// `values` is not `channels` times the number of samples.
    #[error("values holds {values} numbers, but {samples} samples of {channels} channels need {expected}")]
    ShapeMismatch {
        /// Number of samples.
        samples: usize,
        /// Channels per sample.
        channels: u16,
        /// Numbers in `values`.
        values: usize,
        /// `samples * channels`.
        expected: usize,
    },
    /// A sample's time is before the previous sample's.
    #[error("sample {index} is earlier than sample {previous}: timestamps must ascend")]
    Unordered {
        /// The sample out of order.
        index: usize,
        /// The sample before it.
        previous: usize,
    },
    /// A sample's time equals the previous sample's: a frame holds each sample instant once
    /// (ClickHouse keeps one row per instant, so a repeat would be accepted but not stored).
    #[error(
        "sample {index} has the same time as sample {previous}: each sample instant may occur once"
    )]
    Repeated {
        /// The repeated sample.
        index: usize,
        /// The sample before it, at the same time.
        previous: usize,
    },
    /// A sample's time does not fit in an i64 of microseconds.
    #[error("sample {index}'s time overflows")]
    TimeOverflow {
        /// The sample.
        index: usize,
    },
}

impl SensorFrame {
    /// Number of samples (sample instants) in the frame.
    pub fn samples(&self) -> usize {
        self.offsets_us.len()
    }

    /// The absolute time of sample `i`, µs since the epoch.
    pub fn time_us(&self, i: usize) -> Option<i64> {
        self.offsets_us
            .get(i)
            .and_then(|o| self.t0_us.checked_add(*o))
    }

    /// The values of sample `i`, one per channel.
    pub fn sample(&self, i: usize) -> Option<&[f32]> {
        let c = usize::from(self.channels);
        self.values.get(i * c..(i + 1) * c)
    }

    /// The index in `values` of the first value that is not finite or lies outside
    /// `min..=max`, if any: the data type's range check, shared by the gateway and consumers.
    pub fn first_value_outside(&self, min: f32, max: f32) -> Option<usize> {
        self.values
            .iter()
            .position(|v| !(v.is_finite() && *v >= min && *v <= max))
    }

    /// Checks that the parts fit: samples present, `values` shaped `samples × channels`,
    /// times ascending and representable.
    pub fn check_shape(&self) -> Result<(), FrameError> {
        if self.channels == 0 {
            return Err(FrameError::NoChannels);
        }
        if self.offsets_us.is_empty() {
            return Err(FrameError::Empty);
        }
        let expected = self.samples() * usize::from(self.channels);
        if self.values.len() != expected {
            return Err(FrameError::ShapeMismatch {
                samples: self.samples(),
                channels: self.channels,
                values: self.values.len(),
                expected,
            });
        }
        for (index, pair) in self.offsets_us.windows(2).enumerate() {
            if pair[1] < pair[0] {
                return Err(FrameError::Unordered {
                    index: index + 1,
                    previous: index,
                });
            }
        }
        for (index, offset) in self.offsets_us.iter().enumerate() {
            if self.t0_us.checked_add(*offset).is_none() {
                return Err(FrameError::TimeOverflow { index });
            }
        }
        Ok(())
    }

    /// Whether every sample instant occurs once (times strictly ascending). A separate check
    /// from [`SensorFrame::check_shape`]: the gateway refuses a repeated instant (ClickHouse keeps
    /// one row per instant, so it would be accepted but not stored), while a consumer still
    /// writes frames accepted before that rule (their repeats collapse, as they always did).
    pub fn check_distinct_times(&self) -> Result<(), FrameError> {
        match self
            .offsets_us
            .windows(2)
            .position(|pair| pair[1] == pair[0])
        {
            Some(index) => Err(FrameError::Repeated {
                index: index + 1,
                previous: index,
            }),
            None => Ok(()),
        }
    }
}

/// The name of a data type: `[a-z][a-z0-9_]*`, at most 63 bytes (as the Postgres check says).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataTypeName(String);

impl DataTypeName {
    /// Validates a data type name.
    pub fn parse(name: &str) -> Result<Self, String> {
        let mut chars = name.chars();
        let valid = name.len() <= 63
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(format!(
                "'{}' is not a data type name ([a-z][a-z0-9_]*, at most 63 characters)",
                name.escape_debug()
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DataTypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> SensorFrame {
        SensorFrame {
            frame_id: Uuid::nil(),
            session_id: Uuid::nil(),
            user_id: Uuid::nil(),
            device_id: Uuid::nil(),
            data_type: DataTypeName::parse("eeg").unwrap(),
            channels: 2,
            received_at_us: 0,
            t0_us: 1_000,
            offsets_us: vec![0, 10, 20],
            values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        }
    }

    #[test]
    fn a_well_shaped_frame_passes_and_reads_by_sample() {
        let f = frame();
        assert_eq!(f.check_shape(), Ok(()));
        assert_eq!(f.sample(1), Some(&[3.0, 4.0][..]));
        assert_eq!(f.time_us(2), Some(1_020));
        assert_eq!(f.sample(3), None);
        assert_eq!(f.first_value_outside(0.0, 10.0), None);
        assert_eq!(f.first_value_outside(0.0, 4.5), Some(4));
        let mut f = frame();
        f.values[2] = f32::NAN;
        assert_eq!(f.first_value_outside(f32::MIN, f32::MAX), Some(2));
    }

    #[test]
    fn misshapen_frames_say_what_is_wrong() {
        let mut f = frame();
        f.values.pop();
        assert!(matches!(
            f.check_shape(),
            Err(FrameError::ShapeMismatch { expected: 6, .. })
        ));
        let mut f = frame();
        f.offsets_us = vec![0, 20, 10];
        f.values = vec![0.0; 6];
        assert_eq!(
            f.check_shape(),
            Err(FrameError::Unordered {
                index: 2,
                previous: 1
            })
        );
        let mut f = frame();
        f.offsets_us = vec![0, 10, 10];
        f.values = vec![0.0; 6];
        assert_eq!(f.check_shape(), Ok(()));
        assert_eq!(
            f.check_distinct_times(),
            Err(FrameError::Repeated {
                index: 2,
                previous: 1
            })
        );
        let mut f = frame();
        f.offsets_us.clear();
        f.values.clear();
        assert_eq!(f.check_shape(), Err(FrameError::Empty));
        let mut f = frame();
        f.t0_us = i64::MAX;
        assert_eq!(f.check_shape(), Err(FrameError::TimeOverflow { index: 1 }));
    }

    #[test]
    fn data_type_names_are_checked() {
        assert!(DataTypeName::parse("rr_interval").is_ok());
        assert!(DataTypeName::parse("EEG").is_err());
        assert!(DataTypeName::parse("").is_err());
        assert!(DataTypeName::parse("1x").is_err());
        assert!(DataTypeName::parse(&"a".repeat(64)).is_err());
    }
}
