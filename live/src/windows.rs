//! Every window a member holds, and when each may be fed back — the member's bookkeeping without
//! Kafka, so the rebuild rules are tested here.
//!
//! Two gates keep a viewer from ever seeing a metric over part of a window:
//! - a partition being re-read after its assignment feeds nothing until the member has read up
//!   to the partition's end as it was at assignment;
//! - a window is fed only if it lies wholly after the partition's `complete_from` — the time
//!   from which the re-read is known to hold every sample (the lookback's start plus a margin for
//!   device clocks; "now" when the look-up failed). A session that paused for longer than the
//!   lookback, or one on a partition whose offsets could not be looked up, is fed again once new
//!   samples fill a whole window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use biofeed_schema::SensorFrame;
use uuid::Uuid;

use crate::feed::Feed;
use crate::window::{Shape, Window};
use crate::LiveOptions;

/// How an assigned partition stands.
#[derive(Debug, Clone, Copy)]
struct Partition {
    /// Being re-read up to this offset (exclusive), if it still is.
    rebuilding_until: Option<i64>,
    /// Windows reaching back before this sample time (µs) are not fed.
    complete_from_us: i64,
}

struct Entry {
    window: Window,
    partition: i32,
    dirty: bool,
    last_feed: Option<Instant>,
    last_sample: Instant,
}

/// The windows of a member's assigned partitions.
pub struct Windows {
    options: LiveOptions,
    entries: HashMap<(Uuid, String), Entry>,
    partitions: HashMap<i32, Partition>,
}

impl Windows {
    /// No windows yet.
    pub fn new(options: LiveOptions) -> Self {
        Self {
            options,
            entries: HashMap::new(),
            partitions: HashMap::new(),
        }
    }

    /// A partition was assigned: re-read up to `rebuilding_until` (none: nothing to re-read);
    /// windows reaching back before `complete_from_us` are not fed.
    pub fn assigned(
        &mut self,
        partition: i32,
        rebuilding_until: Option<i64>,
        complete_from_us: i64,
    ) {
        self.entries.retain(|_, e| e.partition != partition);
        self.partitions.insert(
            partition,
            Partition {
                rebuilding_until,
                complete_from_us,
            },
        );
    }

    /// A partition was taken away: its windows go.
    pub fn revoked(&mut self, partition: i32) {
        self.entries.retain(|_, e| e.partition != partition);
        self.partitions.remove(&partition);
    }

    /// Partitions still being re-read.
    pub fn rebuilding(&self) -> usize {
        self.partitions
            .values()
            .filter(|p| p.rebuilding_until.is_some())
            .count()
    }

    /// Notes that the message at `offset` of `partition` was read (whatever it holds: an
    /// undecodable one too), which may end the partition's re-read.
    pub fn seen(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.rebuilding_until.is_some_and(|end| offset + 1 >= end) {
                p.rebuilding_until = None;
                tracing::info!(partition, "windows rebuilt; feeding back");
            }
        }
    }

    /// Adds the message at `offset` of `partition`, a frame of a data type with `rate_hz`.
    pub fn take(
        &mut self,
        partition: i32,
        offset: i64,
        frame: &SensorFrame,
        rate_hz: f64,
        now: Instant,
    ) {
        self.seen(partition, offset);
        let name = frame.data_type.as_str();
        let window_us = if name == "eeg" {
            self.options.eeg_window
        } else {
            self.options.window
        };
        let shape = Shape {
            channels: frame.channels,
            rate_hz,
            window_us: window_us.as_micros() as i64,
            plot_us: self.options.plot_span.as_micros() as i64,
            plot_points: self.options.plot_points as usize,
        };
        let entry = self
            .entries
            .entry((frame.session_id, name.to_owned()))
            .or_insert_with(|| Entry {
                window: Window::new(frame.session_id, name, shape),
                partition,
                dirty: false,
                last_feed: None,
                last_sample: now,
            });
        let channels = usize::from(frame.channels.max(1));
        entry.window.add(
            frame
                .offsets_us
                .iter()
                .zip(frame.values.chunks(channels))
                .map(|(offset, values)| (frame.t0_us + offset, values)),
        );
        entry.partition = partition;
        entry.dirty = true;
        entry.last_sample = now;
    }

    /// The feeds due at `now`: windows with new samples, their interval passed, their partition
    /// re-read and the window wholly after its `complete_from`.
    pub fn due(&mut self, now: Instant, now_us: i64) -> Vec<Feed> {
        let interval = self.options.interval;
        let mut feeds = Vec::new();
        for entry in self.entries.values_mut() {
            let Some(partition) = self.partitions.get(&entry.partition) else {
                continue;
            };
            if !entry.dirty
                || partition.rebuilding_until.is_some()
                || entry
                    .last_feed
                    .is_some_and(|t| now.saturating_duration_since(t) < interval)
            {
                continue;
            }
            // The plot too: all the window keeps must lie after `complete_from`.
            let whole = entry.window.newest().is_some_and(|through| {
                through - entry.window.kept_us() >= partition.complete_from_us
            });
            if !whole {
                continue;
            }
            entry.dirty = false;
            entry.last_feed = Some(now);
            feeds.extend(entry.window.feed(now_us));
        }
        feeds
    }

    /// Forgets windows without a sample for `idle`; returns how many windows remain and the
    /// bytes their samples take.
    pub fn evict_idle(&mut self, now: Instant, idle: Duration) -> (usize, usize) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last_sample) < idle);
        (
            self.entries.len(),
            self.entries.values().map(|e| e.window.bytes()).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use biofeed_schema::DataTypeName;

    fn options() -> LiveOptions {
        LiveOptions {
            group: "g".to_owned(),
            instance_id: None,
            session_timeout: Duration::from_secs(10),
            window: Duration::from_secs(10),
            eeg_window: Duration::from_secs(4),
            interval: Duration::from_secs(1),
            plot_span: Duration::from_secs(10),
            plot_points: 100,
            idle: Duration::from_secs(120),
        }
    }

    /// A frame of one beat of 1000 ms at second `s`.
    fn beat(session: Uuid, s: i64) -> SensorFrame {
        SensorFrame {
            frame_id: Uuid::new_v4(),
            session_id: session,
            user_id: Uuid::nil(),
            device_id: Uuid::nil(),
            data_type: DataTypeName::parse("rr_interval").unwrap_or_else(|_| unreachable!()),
            channels: 1,
            received_at_us: 0,
            t0_us: s * 1_000_000,
            offsets_us: vec![0],
            values: vec![1000.0],
        }
    }

    #[test]
    fn a_partition_being_reread_feeds_nothing_until_it_reached_its_end() {
        let (session, now) = (Uuid::from_u128(1), Instant::now());
        let mut w = Windows::new(options());
        w.assigned(0, Some(30), 0);
        for offset in 0..29 {
            w.take(0, offset, &beat(session, 100 + offset), 1.0, now);
            assert!(w.due(now, 0).is_empty(), "fed at offset {offset} of 30");
        }
        assert_eq!(w.rebuilding(), 1);
        w.take(0, 29, &beat(session, 129), 1.0, now);
        assert_eq!(w.rebuilding(), 0);
        let feeds = w.due(now, 0);
        assert_eq!(feeds.len(), 1);
        // The whole 10 s window: beats at 120..=129.
        assert_eq!(feeds[0].samples, 10);
        // Nothing new: nothing due; new samples within the interval: not yet.
        assert!(w.due(now + Duration::from_secs(5), 0).is_empty());
        w.take(0, 30, &beat(session, 130), 1.0, now);
        assert!(w.due(now + Duration::from_millis(500), 0).is_empty());
        assert_eq!(w.due(now + Duration::from_secs(1), 0).len(), 1);
    }

    #[test]
    fn a_window_reaching_back_before_the_reread_waits_for_a_whole_one() {
        let (session, now) = (Uuid::from_u128(2), Instant::now());
        let mut w = Windows::new(options());
        // The re-read holds every sample from 100 s on; the session paused before that.
        w.assigned(3, None, 100_000_000);
        w.take(3, 0, &beat(session, 95), 1.0, now);
        w.take(3, 1, &beat(session, 105), 1.0, now);
        assert!(
            w.due(now, 0).is_empty(),
            "its window (95..105] reaches back before 100 s"
        );
        // An undecodable last message still ends a re-read (seen, never taken).
        w.assigned(4, Some(8), 0);
        w.seen(4, 7);
        assert_eq!(w.rebuilding(), 0);
        // Once the window lies wholly after 100 s, it is fed.
        let later = now + Duration::from_secs(2);
        w.take(3, 2, &beat(session, 110), 1.0, later);
        let feeds = w.due(later, 0);
        assert_eq!(feeds.len(), 1);
        assert_eq!((feeds[0].through_us, feeds[0].samples), (110_000_000, 2));
        // A revoked partition's windows go; unknown partitions feed nothing.
        w.revoked(3);
        w.take(3, 3, &beat(session, 111), 1.0, later);
        assert!(w.due(later + Duration::from_secs(2), 0).is_empty());
        assert_eq!(w.evict_idle(later, Duration::from_secs(120)).0, 1);
        assert_eq!(
            w.evict_idle(later + Duration::from_secs(121), Duration::from_secs(120))
                .0,
            0
        );
    }
}
