//! The session metrics' arithmetic, free of storage: HRV from RR intervals, pulse oximetry, EEG
//! band power. Inputs are samples in time order: (µs since the epoch, values per channel).
//!
//! Definitions (what practitioners expect, and what the tests check by hand):
//! - **RR artefacts**: an interval outside 300–2000 ms, or differing by more than 20 % from the
//!   previous accepted interval, is an artefact and dropped.
//! - **mean RR**, **SDNN** (sample standard deviation, n − 1; needs 2 intervals), **mean HR**
//!   (60 000 / mean RR) over the accepted intervals.
//! - **RMSSD** and **pNN50** over successive differences of *adjacent* accepted intervals: a pair
//!   with an artefact between them, or whose beats are more than 3 s apart in time (a gap in the
//!   recording), is not a successive pair. pNN50: share of |difference| > 50 ms, in percent.
//! - **SpO2**: mean and minimum; time below 90 % sums each sample's duration (to the next sample,
//!   at most two nominal periods; the last sample one period), so gaps do not count as time.
//! - **EEG band power**: Welch's method per channel — 2 s Hann-windowed segments with 50 %
//!   overlap, taken only within gap-free stretches, one-sided power spectral density averaged over
//!   segments — integrated over delta 1–4 Hz, theta 4–8 Hz, alpha 8–13 Hz, beta 13–30 Hz (lower
//!   edge inclusive), in µV².
//! - **HRV coherence** (the resonance-breathing score): the accepted beats' RR series resampled
//!   at 4 Hz by linear interpolation, mean removed, Hann-windowed, its power spectrum; the peak
//!   is the strongest bin in 0.04–0.26 Hz, its power the bins within ±0.015 Hz of it, and the
//!   score is that power over the rest of the power in 0.0033–0.4 Hz (the ratio HeartMath
//!   publishes: slow even breathing near 0.1 Hz drives it up). Needs 32 s of beats without a gap
//!   over 3 s.
//!
//! `for_data_type` chooses the metrics of a data type; the jobs runner (a completed session) and
//! the live feed (a window of an open one) both call it, so the two never disagree.

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

/// One computed metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Its name, e.g. `rmssd_ms`.
    pub name: &'static str,
    /// The channel (0 for single-stream metrics).
    pub channel: u16,
    /// The value.
    pub value: f64,
    /// How many samples (or intervals, or differences) it rests on.
    pub samples: u64,
}

/// A sample: time in µs and one value per channel.
pub type Sample = (i64, Vec<f32>);

const RR_MIN_MS: f64 = 300.0;
const RR_MAX_MS: f64 = 2000.0;
const RR_MAX_CHANGE: f64 = 0.2;
const RR_GAP_US: i64 = 3_000_000;

/// The data types with metrics.
pub const METRIC_DATA_TYPES: [&str; 3] = ["rr_interval", "spo2", "eeg"];

/// The metrics of `samples` of `data_type` (with its channel count and nominal rate; RR's
/// irregular rate is ignored): HRV for `rr_interval`, oximetry for `spo2`, band power for `eeg`,
/// nothing for the others.
pub fn for_data_type(
    data_type: &str,
    channels: usize,
    rate_hz: f64,
    samples: &[Sample],
) -> Vec<Metric> {
    match data_type {
        "rr_interval" => hrv(samples),
        "spo2" => spo2(samples, (1e6 / rate_hz) as i64),
        "eeg" => eeg_band_power(samples, channels.max(1), rate_hz),
        _ => Vec::new(),
    }
}

/// HRV metrics from RR intervals (channel 0, in ms).
pub fn hrv(samples: &[Sample]) -> Vec<Metric> {
    // (time, interval, adjacent to the previous accepted one)
    let mut accepted: Vec<(i64, f64, bool)> = Vec::new();
    let mut previous_was_accepted = false;
    for (t, values) in samples {
        let Some(rr) = values.first().map(|v| f64::from(*v)) else {
            continue;
        };
        let in_range = (RR_MIN_MS..=RR_MAX_MS).contains(&rr);
        let plausible = accepted
            .last()
            .is_none_or(|(_, last, _)| ((rr - last) / last).abs() <= RR_MAX_CHANGE);
        if in_range && plausible {
            let adjacent = previous_was_accepted
                && accepted
                    .last()
                    .is_some_and(|(t_last, _, _)| t - t_last <= RR_GAP_US);
            accepted.push((*t, rr, adjacent));
            previous_was_accepted = true;
        } else {
            previous_was_accepted = false;
        }
    }
    let n = accepted.len();
    if n == 0 {
        return Vec::new();
    }
    let mean = accepted.iter().map(|(_, rr, _)| rr).sum::<f64>() / n as f64;
    let mut metrics = vec![
        metric("mean_rr_ms", 0, mean, n),
        metric("mean_hr_bpm", 0, 60_000.0 / mean, n),
    ];
    if n >= 2 {
        let variance = accepted
            .iter()
            .map(|(_, rr, _)| (rr - mean).powi(2))
            .sum::<f64>()
            / (n - 1) as f64;
        metrics.push(metric("sdnn_ms", 0, variance.sqrt(), n));
    }
    let differences: Vec<f64> = accepted
        .windows(2)
        .filter(|pair| pair[1].2)
        .map(|pair| pair[1].1 - pair[0].1)
        .collect();
    if !differences.is_empty() {
        let d = differences.len();
        let rmssd = (differences.iter().map(|x| x * x).sum::<f64>() / d as f64).sqrt();
        let nn50 = differences.iter().filter(|x| x.abs() > 50.0).count();
        metrics.push(metric("rmssd_ms", 0, rmssd, d));
        metrics.push(metric("pnn50_pct", 0, 100.0 * nn50 as f64 / d as f64, d));
    }
    if let Some(score) = coherence(&accepted) {
        metrics.push(metric("hrv_coherence_ratio", 0, score, n));
    }
    metrics
}

const COHERENCE_RATE_HZ: f64 = 4.0;
const COHERENCE_MIN_SPAN_US: i64 = 32_000_000;

/// The HRV coherence ratio of accepted beats `(time, RR ms, _)` (module docs), if they span 32 s.
fn coherence(accepted: &[(i64, f64, bool)]) -> Option<f64> {
    let (first, last) = (accepted.first()?.0, accepted.last()?.0);
    if last - first < COHERENCE_MIN_SPAN_US || accepted.len() < 16 {
        return None;
    }
    // A gap in the recording would be bridged by a straight line: slow power that is not there.
    if accepted
        .windows(2)
        .any(|pair| pair[1].0 - pair[0].0 > RR_GAP_US)
    {
        return None;
    }
    let step_us = 1e6 / COHERENCE_RATE_HZ;
    let n = ((last - first) as f64 / step_us) as usize + 1;
    let mut series = Vec::with_capacity(n);
    let mut beat = 0;
    for i in 0..n {
        let t = first as f64 + i as f64 * step_us;
        while beat + 2 < accepted.len() && (accepted[beat + 1].0 as f64) < t {
            beat += 1;
        }
        let (t0, v0, _) = accepted[beat];
        let (t1, v1, _) = accepted[(beat + 1).min(accepted.len() - 1)];
        let share = if t1 > t0 {
            ((t - t0 as f64) / (t1 - t0) as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        series.push(v0 + (v1 - v0) * share);
    }
    let mean = series.iter().sum::<f64>() / n as f64;
    let size = n.next_power_of_two();
    let mut buffer: Vec<Complex<f64>> = (0..size)
        .map(|i| {
            let value = series.get(i).map_or(0.0, |v| {
                let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos();
                (v - mean) * w
            });
            Complex::new(value, 0.0)
        })
        .collect();
    FftPlanner::<f64>::new()
        .plan_fft_forward(size)
        .process(&mut buffer);
    let df = COHERENCE_RATE_HZ / size as f64;
    let power: Vec<(f64, f64)> = (1..size / 2)
        .map(|k| (k as f64 * df, buffer[k].norm_sqr()))
        .collect();
    let (peak_f, _) = power
        .iter()
        .filter(|(f, _)| (0.04..=0.26).contains(f))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let peak: f64 = power
        .iter()
        .filter(|(f, _)| (f - peak_f).abs() <= 0.015 + df / 2.0)
        .map(|(_, p)| p)
        .sum();
    let total: f64 = power
        .iter()
        .filter(|(f, _)| (0.0033..=0.4).contains(f))
        .map(|(_, p)| p)
        .sum();
    (total - peak > 0.0).then(|| peak / (total - peak))
}

/// Pulse oximetry metrics (channel 0, in %), with the data type's nominal sample period.
pub fn spo2(samples: &[Sample], period_us: i64) -> Vec<Metric> {
    let values: Vec<(i64, f64)> = samples
        .iter()
        .filter_map(|(t, v)| v.first().map(|x| (*t, f64::from(*x))))
        .collect();
    let n = values.len();
    if n == 0 {
        return Vec::new();
    }
    let mean = values.iter().map(|(_, v)| v).sum::<f64>() / n as f64;
    let min = values.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min);
    let mut below_us = 0i64;
    for (i, (t, v)) in values.iter().enumerate() {
        if *v < 90.0 {
            let duration = values
                .get(i + 1)
                .map_or(period_us, |(next, _)| (next - t).min(2 * period_us));
            below_us += duration;
        }
    }
    vec![
        metric("spo2_mean_pct", 0, mean, n),
        metric("spo2_min_pct", 0, min, n),
        metric("spo2_below_90_s", 0, below_us as f64 / 1e6, n),
    ]
}

/// The EEG bands: name, lower edge (inclusive), upper edge (exclusive), in Hz.
pub const EEG_BANDS: [(&str, f64, f64); 4] = [
    ("eeg_delta_uv2", 1.0, 4.0),
    ("eeg_theta_uv2", 4.0, 8.0),
    ("eeg_alpha_uv2", 8.0, 13.0),
    ("eeg_beta_uv2", 13.0, 30.0),
];

/// EEG band power per channel by Welch's method, at `rate_hz` samples per second.
pub fn eeg_band_power(samples: &[Sample], channels: usize, rate_hz: f64) -> Vec<Metric> {
    let segment = (2.0 * rate_hz).round() as usize;
    if segment < 8 || samples.len() < segment {
        return Vec::new();
    }
    let step = segment / 2;
    let max_gap_us = (1.5e6 / rate_hz).ceil() as i64;
    // Start indices of gap-free stretches.
    let mut starts = vec![0];
    for i in 1..samples.len() {
        if samples[i].0 - samples[i - 1].0 > max_gap_us {
            starts.push(i);
        }
    }
    starts.push(samples.len());
    let mut segments = Vec::new();
    for stretch in starts.windows(2) {
        let mut begin = stretch[0];
        while begin + segment <= stretch[1] {
            segments.push(begin);
            begin += step;
        }
    }
    if segments.is_empty() {
        return Vec::new();
    }
    let window: Vec<f64> = (0..segment)
        .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / segment as f64).cos())
        .collect();
    let window_power: f64 = window.iter().map(|w| w * w).sum();
    let fft = FftPlanner::<f64>::new().plan_fft_forward(segment);
    let df = rate_hz / segment as f64;
    let mut metrics = Vec::new();
    for channel in 0..channels {
        let mut psd = vec![0.0f64; segment / 2 + 1];
        for &begin in &segments {
            let part = &samples[begin..begin + segment];
            let mean = part
                .iter()
                .map(|(_, v)| f64::from(v.get(channel).copied().unwrap_or(0.0)))
                .sum::<f64>()
                / segment as f64;
            let mut buffer: Vec<Complex<f64>> = part
                .iter()
                .zip(&window)
                .map(|((_, v), w)| {
                    Complex::new(
                        (f64::from(v.get(channel).copied().unwrap_or(0.0)) - mean) * w,
                        0.0,
                    )
                })
                .collect();
            fft.process(&mut buffer);
            for (k, p) in psd.iter_mut().enumerate() {
                // One-sided density: double every bin but DC and Nyquist.
                let scale = if k == 0 || k == segment / 2 { 1.0 } else { 2.0 };
                *p += scale * buffer[k].norm_sqr() / (rate_hz * window_power);
            }
        }
        for p in &mut psd {
            *p /= segments.len() as f64;
        }
        for (name, low, high) in EEG_BANDS {
            let power: f64 = psd
                .iter()
                .enumerate()
                .filter(|(k, _)| {
                    let f = *k as f64 * df;
                    f >= low && f < high
                })
                .map(|(_, p)| p * df)
                .sum();
            metrics.push(metric(name, channel as u16, power, segments.len()));
        }
    }
    metrics
}

fn metric(name: &'static str, channel: u16, value: f64, samples: usize) -> Metric {
    Metric {
        name,
        channel,
        value,
        samples: samples as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(intervals: &[f32]) -> Vec<Sample> {
        let mut t = 0i64;
        intervals
            .iter()
            .map(|rr| {
                t += (*rr as i64) * 1000;
                (t, vec![*rr])
            })
            .collect()
    }

    fn get(metrics: &[Metric], name: &str) -> Option<f64> {
        metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    #[test]
    fn hrv_matches_values_computed_by_hand() {
        // 800, 810, 790, 800: mean 800; deviations 0, 10, −10, 0 → SDNN √(200/3);
        // differences 10, −20, 10 → RMSSD √(600/3); none above 50 ms.
        let m = hrv(&rr(&[800.0, 810.0, 790.0, 800.0]));
        assert_eq!(get(&m, "mean_rr_ms"), Some(800.0));
        assert_eq!(get(&m, "mean_hr_bpm"), Some(75.0));
        assert!((get(&m, "sdnn_ms").unwrap() - (200.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((get(&m, "rmssd_ms").unwrap() - 200.0f64.sqrt()).abs() < 1e-12);
        assert_eq!(get(&m, "pnn50_pct"), Some(0.0));
        // 1000, 940, 1000, 1060, 1000: differences −60, 60, 60, −60 → pNN50 100 %.
        let m = hrv(&rr(&[1000.0, 940.0, 1000.0, 1060.0, 1000.0]));
        assert_eq!(get(&m, "pnn50_pct"), Some(100.0));
        assert_eq!(get(&m, "rmssd_ms"), Some(60.0));
    }

    #[test]
    fn hrv_edge_cases_one_beat_artefacts_and_gaps() {
        // One interval: a mean, no spread.
        let m = hrv(&rr(&[850.0]));
        assert_eq!(get(&m, "mean_rr_ms"), Some(850.0));
        assert_eq!((get(&m, "sdnn_ms"), get(&m, "rmssd_ms")), (None, None));
        assert!(hrv(&[]).is_empty());
        // An ectopic beat (400 ms, −50 %) and an out-of-range value are dropped, and the beats
        // on either side of them are not a successive pair.
        let m = hrv(&rr(&[800.0, 820.0, 400.0, 810.0, 3000.0, 790.0]));
        assert_eq!(
            m.iter().find(|x| x.name == "mean_rr_ms").unwrap().samples,
            4
        );
        assert_eq!(get(&m, "mean_rr_ms"), Some(805.0));
        // Successive pairs: (800, 820) only → RMSSD 20.
        assert_eq!(get(&m, "rmssd_ms"), Some(20.0));
        // A 10 s gap in the recording breaks the pair too.
        let mut with_gap = rr(&[800.0, 820.0]);
        with_gap.push((with_gap[1].0 + 10_000_000, vec![830.0]));
        let m = hrv(&with_gap);
        assert_eq!(get(&m, "rmssd_ms"), Some(20.0));
        assert_eq!(m.iter().find(|x| x.name == "rmssd_ms").unwrap().samples, 1);
    }

    #[test]
    fn coherence_is_high_for_breathing_at_resonance_and_low_for_noise() {
        // Two minutes of beats around 900 ms: modulated by 0.1 Hz breathing (±60 ms), or by
        // pseudo-random jitter of the same size.
        let beats = |rr_at: &mut dyn FnMut(usize, f64) -> f64| {
            let mut t = 0.0f64;
            let mut out = Vec::new();
            for i in 0..140 {
                let rr = rr_at(i, t);
                t += rr / 1000.0;
                out.push(((t * 1e6) as i64, vec![rr as f32]));
            }
            out
        };
        let resonant =
            beats(&mut |_, t| 900.0 + 60.0 * (2.0 * std::f64::consts::PI * 0.1 * t).sin());
        let mut seed = 7u64;
        let noisy = beats(&mut |_, _| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            900.0 + ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 120.0
        });
        let score = |s: &[Sample]| get(&hrv(s), "hrv_coherence_ratio").unwrap();
        assert!(score(&resonant) > 5.0, "{}", score(&resonant));
        assert!(score(&noisy) < 1.0, "{}", score(&noisy));
        // Under 32 s of beats: no score.
        assert_eq!(get(&hrv(&resonant[..30]), "hrv_coherence_ratio"), None);
        // Nor across a 10 s gap in the recording.
        let mut gap = resonant.clone();
        for beat in &mut gap[70..] {
            beat.0 += 10_000_000;
        }
        assert_eq!(get(&hrv(&gap), "hrv_coherence_ratio"), None);
    }

    #[test]
    fn spo2_counts_time_below_90_without_counting_gaps() {
        let s = |t: i64, v: f32| (t * 1_000_000, vec![v]);
        // 1 Hz: 97, 89, 88, then a 60 s gap, 89, 96.
        let samples = vec![s(0, 97.0), s(1, 89.0), s(2, 88.0), s(62, 89.0), s(63, 96.0)];
        let m = spo2(&samples, 1_000_000);
        assert_eq!(get(&m, "spo2_min_pct"), Some(88.0));
        assert!((get(&m, "spo2_mean_pct").unwrap() - 91.8).abs() < 1e-9);
        // 1 s + 2 s (the gap capped at two periods) + 1 s.
        assert_eq!(get(&m, "spo2_below_90_s"), Some(4.0));
        assert!(spo2(&[], 1_000_000).is_empty());
    }

    #[test]
    fn eeg_power_lands_in_the_band_of_the_rhythm() {
        let rate = 256.0;
        // 20 s of a 10 Hz rhythm of amplitude 20 µV on channel 0, a 6 Hz one of 10 µV on channel 1.
        let samples: Vec<Sample> = (0..(20 * 256))
            .map(|i| {
                let t = i as f64 / rate;
                (
                    (t * 1e6) as i64,
                    vec![
                        (20.0 * (2.0 * std::f64::consts::PI * 10.0 * t).sin()) as f32,
                        (10.0 * (2.0 * std::f64::consts::PI * 6.0 * t).sin()) as f32,
                    ],
                )
            })
            .collect();
        let m = eeg_band_power(&samples, 2, rate);
        let power = |name: &str, channel: u16| {
            m.iter()
                .find(|x| x.name == name && x.channel == channel)
                .unwrap()
                .value
        };
        // A sine of amplitude A has power A²/2: 200 µV² and 50 µV².
        assert!(
            (power("eeg_alpha_uv2", 0) - 200.0).abs() < 200.0 * 0.02,
            "{m:?}"
        );
        assert!(
            power("eeg_theta_uv2", 0) < 1.0 && power("eeg_beta_uv2", 0) < 1.0,
            "{m:?}"
        );
        assert!(
            (power("eeg_theta_uv2", 1) - 50.0).abs() < 50.0 * 0.02,
            "{m:?}"
        );
        assert!(power("eeg_alpha_uv2", 1) < 0.5, "{m:?}");
        // Too short for one segment: nothing.
        assert!(eeg_band_power(&samples[..100], 2, rate).is_empty());
    }
}
