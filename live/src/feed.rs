//! What a viewer receives: one JSON document per session and data type, at most once per
//! interval, while new samples arrive.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The rolling metrics of one data type of an open session, and its newest samples for a plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feed {
    /// The session.
    pub session_id: Uuid,
    /// The data type, e.g. `rr_interval`.
    pub data_type: String,
    /// Values per sample.
    pub channels: u16,
    /// The window's length in µs: the metrics cover the samples with
    /// `through_us - window_us < t_us <= through_us` (for a data type without metrics, the
    /// plot span).
    pub window_us: i64,
    /// The newest sample's time, µs since the epoch.
    pub through_us: i64,
    /// Samples in the window.
    pub samples: u64,
    /// The window's metrics (the session metrics' arithmetic, `biofeed-signals`); empty for data
    /// types without metrics or while the window holds too few samples.
    pub metrics: Vec<FeedMetric>,
    /// The newest samples, downsampled for a live plot.
    pub plot: Plot,
    /// When the live member computed this, µs since the epoch.
    pub computed_at_us: i64,
}

/// One metric, as in the session metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedMetric {
    /// Its name, e.g. `rmssd_ms`.
    pub name: String,
    /// The channel, from 0.
    pub channel: u16,
    /// The value.
    pub value: f64,
    /// How many samples (or intervals, or segments) it rests on.
    pub samples: u64,
}

/// The newest seconds of a data type, at most a set number of points: each point the mean of
/// the samples in its bucket, timed by the bucket's first sample (raw samples when they fit).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plot {
    /// Each point's time, µs since the epoch.
    pub t_us: Vec<i64>,
    /// Per channel, one value per point.
    pub values: Vec<Vec<f32>>,
}

impl Feed {
    /// The Kafka key of a feed message: the session, then the data type (`<uuid>/<name>`), so a
    /// session's feeds stay in one partition and a reader can route one without parsing it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.session_id, self.data_type)
    }
}

/// Reads a feed message's key back: the session and the data type.
pub fn parse_key(key: &[u8]) -> Option<(Uuid, &str)> {
    let key = std::str::from_utf8(key).ok()?;
    let (session, data_type) = key.split_once('/')?;
    Some((Uuid::try_parse(session).ok()?, data_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_junk_is_refused() {
        let session = Uuid::from_u128(7);
        let feed = Feed {
            session_id: session,
            data_type: "eeg".to_owned(),
            channels: 8,
            window_us: 1,
            through_us: 1,
            samples: 0,
            metrics: Vec::new(),
            plot: Plot::default(),
            computed_at_us: 0,
        };
        assert_eq!(parse_key(feed.key().as_bytes()), Some((session, "eeg")));
        assert_eq!(parse_key(b"not-a-uuid/eeg"), None);
        assert_eq!(parse_key(b"no slash"), None);
        assert_eq!(parse_key(&[0xff, 0xfe]), None);
    }
}
