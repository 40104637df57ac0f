//! A window of one data type of one session: the newest samples by time, a re-sent sample
//! replacing the one of the same instant (as `points FINAL` collapses it), and the feed computed
//! from it. Pure: no I/O, so the arithmetic is tested here.

use std::collections::VecDeque;

use biofeed_signals::Sample;
use uuid::Uuid;

use crate::feed::{Feed, FeedMetric, Plot};

/// How a data type is fed back: its shape and the window's length.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Values per sample.
    pub channels: u16,
    /// Nominal samples per second (RR's irregular rate: 1).
    pub rate_hz: f64,
    /// The metrics' window, µs.
    pub window_us: i64,
    /// The plot's span, µs.
    pub plot_us: i64,
    /// At most this many plot points.
    pub plot_points: usize,
}

/// The newest samples of one data type of a session: their times in order, and their values
/// flat (`channels` per sample) in the same order. A session's frames arrive in order (one
/// partition), so adding is an append; a late or re-sent sample is put in place.
#[derive(Debug, Clone)]
pub struct Window {
    session: Uuid,
    data_type: String,
    shape: Shape,
    /// Whether the data type has metrics (else only the plot span is kept).
    metrics: bool,
    times: VecDeque<i64>,
    values: VecDeque<f32>,
}

impl Window {
    /// An empty window.
    pub fn new(session: Uuid, data_type: &str, shape: Shape) -> Self {
        Self {
            session,
            data_type: data_type.to_owned(),
            metrics: biofeed_signals::METRIC_DATA_TYPES.contains(&data_type),
            shape,
            times: VecDeque::new(),
            values: VecDeque::new(),
        }
    }

    fn channels(&self) -> usize {
        usize::from(self.shape.channels.max(1))
    }

    /// Adds samples `(t_us, values)` (`channels` values each; a sample of another width is
    /// ignored); a sample of an instant already held replaces it. Samples older than the
    /// window behind the newest are dropped.
    pub fn add<'v>(&mut self, samples: impl IntoIterator<Item = (i64, &'v [f32])>) {
        let channels = self.channels();
        for (t, values) in samples {
            if values.len() != channels {
                continue;
            }
            match self.times.back() {
                Some(&newest) if t <= newest => {
                    let at = self.times.partition_point(|&x| x < t);
                    if self.times.get(at) == Some(&t) {
                        for (c, v) in values.iter().enumerate() {
                            self.values[at * channels + c] = *v;
                        }
                    } else {
                        self.times.insert(at, t);
                        for (c, v) in values.iter().enumerate() {
                            self.values.insert(at * channels + c, *v);
                        }
                    }
                }
                _ => {
                    self.times.push_back(t);
                    self.values.extend(values);
                }
            }
        }
        if let Some(&newest) = self.times.back() {
            let keep = self.kept_us();
            let old = self.times.partition_point(|&x| x <= newest - keep);
            self.times.drain(..old);
            self.values.drain(..old * channels);
        }
    }

    /// How far back from the newest sample the window keeps samples (the metrics' window or the
    /// plot span, the longer).
    pub fn kept_us(&self) -> i64 {
        self.window_us().max(self.shape.plot_us)
    }

    fn window_us(&self) -> i64 {
        if self.metrics {
            self.shape.window_us
        } else {
            self.shape.plot_us
        }
    }

    /// The newest sample's time.
    pub fn newest(&self) -> Option<i64> {
        self.times.back().copied()
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether it holds no sample.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Bytes its samples take (for the memory gauge).
    pub fn bytes(&self) -> usize {
        self.times.capacity() * 8 + self.values.capacity() * 4
    }

    /// The samples with `t > from`, as the arithmetic takes them.
    fn since(&mut self, from: i64) -> impl Iterator<Item = (i64, &[f32])> + '_ {
        let channels = self.channels();
        let first = self.times.partition_point(|&x| x <= from);
        let values: &[f32] = self.values.make_contiguous();
        let times = &self.times;
        (first..times.len()).map(move |i| (times[i], &values[i * channels..(i + 1) * channels]))
    }

    /// The feed of the window as it stands (none while empty), computed at `now_us`.
    pub fn feed(&mut self, now_us: i64) -> Option<Feed> {
        let through = self.newest()?;
        let window_us = self.window_us();
        let from = through - window_us;
        let channels = usize::from(self.shape.channels);
        let rate_hz = self.shape.rate_hz;
        let (samples, metrics) = if self.metrics {
            let window: Vec<Sample> = self.since(from).map(|(t, v)| (t, v.to_vec())).collect();
            let metrics =
                biofeed_signals::for_data_type(&self.data_type, channels, rate_hz, &window)
                    .into_iter()
                    .filter(|m| m.value.is_finite())
                    .map(|m| FeedMetric {
                        name: m.name.to_owned(),
                        channel: m.channel,
                        value: m.value,
                        samples: m.samples,
                    })
                    .collect();
            (window.len(), metrics)
        } else {
            (self.since(from).count(), Vec::new())
        };
        Some(Feed {
            session_id: self.session,
            data_type: self.data_type.clone(),
            channels: self.shape.channels,
            window_us,
            through_us: through,
            samples: samples as u64,
            metrics,
            plot: self.plot(through),
            computed_at_us: now_us,
        })
    }

    /// The newest `plot_us` downsampled into at most `plot_points` buckets of equal length.
    fn plot(&mut self, through: i64) -> Plot {
        let channels = usize::from(self.shape.channels);
        let from = through - self.shape.plot_us;
        let points = i64::try_from(self.shape.plot_points.max(1)).unwrap_or(i64::MAX);
        let span = self.shape.plot_us.max(1);
        let mut plot = Plot {
            t_us: Vec::new(),
            values: vec![Vec::new(); channels],
        };
        let mut current: Option<(i64, i64, Vec<f64>, u32)> = None;
        let close = |plot: &mut Plot, (_, t0, sums, n): (i64, i64, Vec<f64>, u32)| {
            plot.t_us.push(t0);
            for (channel, sum) in sums.iter().enumerate() {
                plot.values[channel].push((sum / f64::from(n)) as f32);
            }
        };
        for (t, values) in self.since(from) {
            // In 0..points: a sample at `from + 1` opens the first bucket, one at `through` the last.
            // In i64 (a 128-bit division per sample took a fifth of the live member's time);
            // in i128 only where the product would not fit (a plot of decades).
            let offset = t - from - 1;
            let bucket = match offset.checked_mul(points) {
                Some(product) => product / span,
                None => (i128::from(offset) * i128::from(points) / i128::from(span)) as i64,
            };
            match &mut current {
                Some((b, _, sums, n)) if *b == bucket => {
                    for (sum, v) in sums.iter_mut().zip(values) {
                        *sum += f64::from(*v);
                    }
                    *n += 1;
                }
                _ => {
                    if let Some(done) = current.take() {
                        close(&mut plot, done);
                    }
                    let mut sums = vec![0.0; channels];
                    for (sum, v) in sums.iter_mut().zip(values) {
                        *sum = f64::from(*v);
                    }
                    current = Some((bucket, t, sums, 1));
                }
            }
        }
        if let Some(done) = current.take() {
            close(&mut plot, done);
        }
        plot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(window_s: i64, plot_points: usize) -> Shape {
        Shape {
            channels: 1,
            rate_hz: 1.0,
            window_us: window_s * 1_000_000,
            plot_us: 10_000_000,
            plot_points,
        }
    }

    fn add(w: &mut Window, samples: &[(i64, Vec<f32>)]) {
        w.add(samples.iter().map(|(t, v)| (*t, v.as_slice())));
    }

    fn beats(from_s: i64, rr: &[f32]) -> Vec<(i64, Vec<f32>)> {
        let mut t = from_s * 1_000_000;
        rr.iter()
            .map(|v| {
                t += (*v as i64) * 1000;
                (t, vec![*v])
            })
            .collect()
    }

    #[test]
    fn the_feed_is_the_session_arithmetic_over_the_window_only() {
        let mut w = Window::new(Uuid::from_u128(1), "rr_interval", shape(5, 100));
        // 10 beats of 1 s, then 4 of 800 ms: a 5 s window ending at the newest beat holds the
        // four short ones and the last long one (its time is 5.2 s before the newest: outside).
        let mut all = beats(0, &[1000.0; 10]);
        all.extend(beats(10, &[800.0; 4]));
        add(&mut w, &all);
        let feed = w.feed(42).unwrap();
        let through = all.last().unwrap().0;
        let expected: Vec<Sample> = all
            .iter()
            .filter(|(t, _)| *t > through - 5_000_000)
            .cloned()
            .collect();
        assert_eq!(feed.samples, expected.len() as u64);
        assert_eq!(feed.through_us, through);
        let arithmetic = biofeed_signals::hrv(&expected);
        assert_eq!(feed.metrics.len(), arithmetic.len());
        for (m, a) in feed.metrics.iter().zip(&arithmetic) {
            assert_eq!(
                (m.name.as_str(), m.value, m.samples),
                (a.name, a.value, a.samples)
            );
        }
        assert_eq!(feed.computed_at_us, 42);
    }

    #[test]
    fn a_resent_sample_replaces_and_old_samples_leave() {
        let mut w = Window::new(Uuid::from_u128(1), "heart_rate", shape(5, 100));
        add(&mut w, &[(1_000_000, vec![60.0]), (2_000_000, vec![61.0])]);
        add(&mut w, &[(2_000_000, vec![62.0])]);
        assert_eq!(w.len(), 2);
        // Kept (no metrics for heart rate): the plot span (10 s) behind the newest.
        add(&mut w, &[(11_500_000, vec![70.0])]);
        assert_eq!(w.len(), 2, "the sample at 1 s is more than 10 s behind");
        // A late sample older than that is dropped at once.
        add(&mut w, &[(500_000, vec![1.0])]);
        assert_eq!(w.len(), 2);
        assert!(Window::new(Uuid::nil(), "eeg", shape(5, 10))
            .feed(0)
            .is_none());
        // A sample out of order goes in its place; one of the wrong width is ignored.
        add(
            &mut w,
            &[(11_000_000, vec![65.0]), (11_200_000, vec![1.0, 2.0])],
        );
        let plot = w.feed(0).unwrap().plot;
        assert_eq!(plot.t_us, vec![2_000_000, 11_000_000, 11_500_000]);
        assert_eq!(
            plot.values[0],
            vec![62.0, 65.0, 70.0],
            "the re-sent sample replaced the first"
        );
    }

    #[test]
    fn the_plot_is_bucket_means_never_more_points_than_asked() {
        let mut w = Window::new(Uuid::from_u128(1), "ppg", shape(5, 10));
        // 100 Hz for 10 s: 1000 samples, 10 buckets of 1 s.
        add(
            &mut w,
            &(1..=1000)
                .map(|i| (i * 10_000, vec![i as f32]))
                .collect::<Vec<_>>(),
        );
        let feed = w.feed(0).unwrap();
        assert_eq!(feed.plot.t_us.len(), 10);
        // 256 Hz into 300 points over 10 s (a span the points do not divide): never 301.
        let mut eeg = Window::new(Uuid::from_u128(2), "eeg", shape(4, 300));
        add(
            &mut eeg,
            &(0..2560)
                .map(|i| (1_000_000 + i * 3_906, vec![0.0]))
                .collect::<Vec<_>>(),
        );
        assert_eq!(eeg.feed(0).unwrap().plot.t_us.len(), 300);
        assert_eq!(feed.plot.values[0].len(), 10);
        // The first bucket holds samples 1..=100: mean 50.5, timed at the first.
        assert_eq!(feed.plot.t_us[0], 10_000);
        assert_eq!(feed.plot.values[0][0], 50.5);
        // Sparse data keeps every sample.
        let mut rr = Window::new(Uuid::from_u128(1), "rr_interval", shape(60, 100));
        add(&mut rr, &beats(0, &[900.0, 910.0, 905.0]));
        assert_eq!(
            rr.feed(0).unwrap().plot.values[0],
            vec![900.0, 910.0, 905.0]
        );
    }
}
