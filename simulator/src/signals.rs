//! Synthetic physiology, generated sample by sample in real time.
//!
//! - **Heart**: RR intervals around a personal resting rate, modulated by respiratory sinus
//!   arrhythmia (RSA: the heart speeds up on inhalation, at the breathing rate), a slower Mayer
//!   wave (≈0.1 Hz), and beat-to-beat noise; now and then an ectopic beat (a short interval and
//!   a compensatory long one), as real chest straps record them.
//! - **Pulse oximetry**: SpO2 near a personal baseline with sensor noise, and occasional
//!   desaturations (a dip of 5–10 points over ~10 s, recovering over ~20 s); a two-channel PPG
//!   (red, infrared) pulsing at the heart rate.
//! - **EEG**: 8 channels (10–20 positions Fp1…O2) of background activity with a roughly 1/f
//!   spectrum plus an alpha rhythm (8–12 Hz) strongest over the occipital channels.
//! - **ECG** ([`ecg_mv`], for the benchmarks' 1 kHz single-lead devices): P, QRS and T waves at
//!   a breathing-modulated rate on a wandering baseline, with noise.
//!
//! Every value is quantised as the device it imitates reports it ([`resolution`]): a real
//! device never sends more precision than its sensor has, and a lossless store can only shrink
//! a signal down to that precision, so a simulator that invented digits would make every
//! storage figure measured with it too high.

use std::f64::consts::TAU;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The step each imitated device reports its values in (what one least significant bit is
/// worth, in the data type's unit).
pub mod resolution {
    /// `rr_interval` (ms): chest straps (Polar H10, Garmin HRM-Pro, the Bluetooth Heart Rate
    /// Profile) report RR intervals in units of 1/1024 s.
    pub const RR_INTERVAL_MS: f64 = 1000.0 / 1024.0;
    /// `heart_rate` (bpm): whole beats per minute (the Heart Rate Profile's 8- or 16-bit field).
    pub const HEART_RATE_BPM: f64 = 1.0;
    /// `spo2` (%): pulse oximeters report whole percent.
    pub const SPO2_PERCENT: f64 = 1.0;
    /// `ppg` (a.u.): the raw photodiode ADC counts.
    pub const PPG_COUNTS: f64 = 1.0;
    /// `eeg` (µV): a 24-bit front end (TI ADS1299 at gain 24, 4.5 V reference): one LSB is
    /// 4.5 V / 24 / 2²³ ≈ 0.0224 µV.
    pub const EEG_UV: f64 = 4.5e6 / 24.0 / 8_388_608.0;
    /// `ecg` (mV): chest ECG devices (Polar H10, Movesense) report whole microvolts.
    pub const ECG_MV: f64 = 0.001;
}

/// The P, Q, R, S and T waves of one beat: (phase in the beat, amplitude in mV, width in
/// phase), after McSharry et al.'s dynamical ECG model.
const ECG_WAVES: [(f64, f64, f64); 5] = [
    (0.20, 0.15, 0.025),
    (0.36, -0.10, 0.010),
    (0.40, 1.20, 0.012),
    (0.44, -0.25, 0.012),
    (0.65, 0.30, 0.050),
];

/// One beat sampled at 4096 phases (computed once: the benchmarks ask for a million samples a
/// second).
fn ecg_beat() -> &'static [f64; 4096] {
    static BEAT: std::sync::OnceLock<Box<[f64; 4096]>> = std::sync::OnceLock::new();
    BEAT.get_or_init(|| {
        let mut beat = Box::new([0.0; 4096]);
        for (i, value) in beat.iter_mut().enumerate() {
            let phase = i as f64 / 4096.0;
            *value = ECG_WAVES
                .iter()
                .map(|(at, amplitude, width)| {
                    amplitude * (-((phase - at) / width).powi(2) / 2.0).exp()
                })
                .sum();
        }
        beat
    })
}

/// SplitMix64: a well-mixed 64-bit hash of `x` (stateless noise).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A single-lead ECG (mV) at `t_us`, as a chest device reports it (whole µV): beats at a
/// personal rate of 55–85 bpm, sped up and slowed by breathing (±5 % at 0.2 Hz), on a wandering
/// baseline (±0.05 mV at 0.3 Hz), with ~10 µV of noise. Stateless — a function of the person
/// (`seed`) and the time — so that the benchmarks' devices can compute any sample cheaply.
pub fn ecg_mv(seed: u64, t_us: i64) -> f32 {
    use std::f64::consts::TAU;
    let mixed = splitmix64(seed);
    let bpm = 55.0 + (mixed % 30) as f64;
    // Every periodic term is reduced to its period in integer µs first: at today's timestamps
    // (1.8e9 s) sin and cos of the raw phase would take glibc's slow argument reduction, a
    // million times a second in the benchmarks' devices.
    const BREATH_US: i64 = 5_000_000; // 0.2 Hz
    const WANDER_US: i64 = 10_000_000 / 3; // 0.3 Hz
    let rsa = 0.05;
    let breath = TAU * t_us.rem_euclid(BREATH_US) as f64 / BREATH_US as f64;
    // The beat phase: the integral of a rate modulated by breathing, in beats (mod 1). Beats
    // elapsed are counted in integer µs × bpm, exactly, before the fraction is taken.
    let steady = (i128::from(t_us) * (bpm as i128)).rem_euclid(60_000_000) as f64 / 60_000_000.0;
    let beats = steady - rsa * bpm / 60.0 * (BREATH_US as f64 / 1e6) / TAU * breath.cos();
    let beat = ecg_beat()[(beats.rem_euclid(1.0) * 4096.0) as usize % 4096];
    let wander = 0.05
        * (TAU * t_us.rem_euclid(WANDER_US) as f64 / WANDER_US as f64
            + ((mixed >> 32) % 628) as f64 / 100.0)
            .sin();
    // Triangular noise from two uniform draws: σ ≈ 10 µV.
    let bits = splitmix64(mixed ^ t_us as u64);
    let uniform = |b: u64| (b & 0xFFFF_FFFF) as f64 / 4_294_967_296.0 - 0.5;
    let noise = 0.0245 * (uniform(bits) + uniform(bits >> 32));
    quantise(beat + wander + noise, resolution::ECG_MV)
}

/// `value` rounded to a whole number of `step`s, as a device with that resolution reports it.
pub fn quantise(value: f64, step: f64) -> f32 {
    ((value / step).round() * step) as f32
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// One person's heart: produces beat times and RR intervals.
#[derive(Debug)]
pub struct Heart {
    rng: StdRng,
    base_rr_ms: f64,
    rsa_ms: f64,
    breath_hz: f64,
    mayer_phase: f64,
    next_beat_us: i64,
    /// The interval drawn but not yet elapsed.
    pending: Option<f64>,
    /// The pause owed after an ectopic beat.
    compensation: Option<f64>,
}

impl Heart {
    /// A heart with a resting rate between 55 and 85 bpm, breathing 6–15 times a minute.
    pub fn new(seed: u64, start_us: i64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let bpm = rng.gen_range(55.0..85.0);
        Self {
            base_rr_ms: 60_000.0 / bpm,
            rsa_ms: rng.gen_range(20.0..70.0),
            breath_hz: rng.gen_range(0.1..0.25),
            mayer_phase: rng.gen_range(0.0..TAU),
            next_beat_us: start_us,
            pending: None,
            compensation: None,
            rng,
        }
    }

    fn rr_at(&mut self, t_us: i64) -> f64 {
        let t = t_us as f64 / 1e6;
        let rsa = self.rsa_ms * (TAU * self.breath_hz * t).sin();
        let mayer = 12.0 * (TAU * 0.1 * t + self.mayer_phase).sin();
        let noise = 12.0 * gaussian(&mut self.rng);
        (self.base_rr_ms + rsa + mayer + noise).clamp(320.0, 1900.0)
    }

    /// The next interval: usually the modulated rhythm; now and then an ectopic beat (early)
    /// followed by its compensatory pause.
    fn draw(&mut self) -> f64 {
        if let Some(rr) = self.compensation.take() {
            return rr;
        }
        let normal = self.rr_at(self.next_beat_us);
        if self.rng.gen_bool(0.004) {
            self.compensation = Some((normal * 1.4).min(1900.0));
            return normal * 0.6;
        }
        normal
    }

    /// The beats in `[.., until_us)`: (beat time, RR interval ending at it, in ms).
    pub fn beats_until(&mut self, until_us: i64) -> Vec<(i64, f32)> {
        let mut beats = Vec::new();
        loop {
            let rr = match self.pending.take() {
                Some(rr) => rr,
                None => f64::from(quantise(self.draw(), resolution::RR_INTERVAL_MS)),
            };
            let at = self.next_beat_us + (rr * 1000.0) as i64;
            if at >= until_us {
                self.pending = Some(rr);
                return beats;
            }
            self.next_beat_us = at;
            beats.push((at, rr as f32));
        }
    }

    /// The current heart rate in bpm.
    pub fn rate_bpm(&mut self, t_us: i64) -> f32 {
        quantise(60_000.0 / self.rr_at(t_us), resolution::HEART_RATE_BPM)
    }
}

/// One person's pulse oximeter.
#[derive(Debug)]
pub struct Oximeter {
    rng: StdRng,
    baseline: f64,
    dip_started_us: Option<i64>,
    dip_depth: f64,
}

impl Oximeter {
    /// Baseline 96–99 %.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5A5A);
        Self {
            baseline: rng.gen_range(96.0..99.0),
            rng,
            dip_started_us: None,
            dip_depth: 0.0,
        }
    }

    /// The SpO2 at `t_us`, one call per second.
    pub fn spo2(&mut self, t_us: i64) -> f32 {
        if self.dip_started_us.is_none() && self.rng.gen_bool(1.0 / 90.0) {
            self.dip_started_us = Some(t_us);
            self.dip_depth = self.rng.gen_range(5.0..10.0);
        }
        let dip = match self.dip_started_us {
            Some(start) => {
                let s = (t_us - start) as f64 / 1e6;
                if s < 10.0 {
                    self.dip_depth * s / 10.0
                } else if s < 30.0 {
                    self.dip_depth * (30.0 - s) / 20.0
                } else {
                    self.dip_started_us = None;
                    0.0
                }
            }
            None => 0.0,
        };
        quantise(
            (self.baseline - dip + 0.3 * gaussian(&mut self.rng)).clamp(50.0, 100.0),
            resolution::SPO2_PERCENT,
        )
    }

    /// The red and infrared PPG values at `t_us`, pulsing at `bpm`.
    pub fn ppg(&mut self, t_us: i64, bpm: f32) -> [f32; 2] {
        let phase = (t_us as f64 / 1e6) * f64::from(bpm) / 60.0;
        let pulse = (TAU * phase).sin() + 0.3 * (2.0 * TAU * phase).sin();
        let noise = gaussian(&mut self.rng);
        [
            quantise(
                20_000.0 + 1_500.0 * pulse + 50.0 * noise,
                resolution::PPG_COUNTS,
            ),
            quantise(
                30_000.0 + 2_500.0 * pulse + 50.0 * noise,
                resolution::PPG_COUNTS,
            ),
        ]
    }
}

/// One person's EEG: 8 channels.
#[derive(Debug)]
pub struct Eeg {
    rng: StdRng,
    alpha_hz: f64,
    alpha_uv: f64,
    /// Background components per channel: (frequency, amplitude, phase).
    background: Vec<Vec<(f64, f64, f64)>>,
}

/// Alpha strength per channel (Fp1, Fp2, C3, C4, P3, P4, O1, O2): occipital strongest.
const ALPHA_GAIN: [f64; 8] = [0.3, 0.3, 0.5, 0.5, 0.8, 0.8, 1.0, 1.0];

impl Eeg {
    /// An alpha rhythm at 8–12 Hz of 15–35 µV over a 1/f background.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xEE6);
        let background = (0..8)
            .map(|_| {
                (1..=40)
                    .map(|f| {
                        let f = f64::from(f) + rng.gen_range(-0.4..0.4);
                        (f, 25.0 / f.sqrt(), rng.gen_range(0.0..TAU))
                    })
                    .collect()
            })
            .collect();
        Self {
            alpha_hz: rng.gen_range(8.5..11.5),
            alpha_uv: rng.gen_range(15.0..35.0),
            background,
            rng,
        }
    }

    /// The 8 channels at `t_us`, in µV.
    pub fn sample(&mut self, t_us: i64) -> [f32; 8] {
        let t = t_us as f64 / 1e6;
        // The alpha rhythm waxes and wanes (eyes-closed bursts) every few seconds.
        let envelope = 0.6 + 0.4 * (TAU * 0.15 * t).sin();
        let alpha = self.alpha_uv * envelope * (TAU * self.alpha_hz * t).sin();
        let mut out = [0f32; 8];
        for (c, value) in out.iter_mut().enumerate() {
            let background: f64 = self.background[c]
                .iter()
                .map(|(f, a, p)| a * (TAU * f * t + p).sin())
                .sum::<f64>()
                / 4.0;
            let noise = 3.0 * gaussian(&mut self.rng);
            *value = quantise(
                (ALPHA_GAIN[c] * alpha + background + noise).clamp(-1_900.0, 1_900.0),
                resolution::EEG_UV,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rr_intervals_are_physiological_and_vary_with_breathing() {
        let mut heart = Heart::new(7, 0);
        let beats = heart.beats_until(300_000_000);
        // About 55–85 beats a minute for 5 minutes.
        assert!((250..450).contains(&beats.len()), "{}", beats.len());
        assert!(beats.iter().all(|(_, rr)| (200.0..=2500.0).contains(rr)));
        let rr: Vec<f64> = beats.iter().map(|(_, rr)| f64::from(*rr)).collect();
        let mean = rr.iter().sum::<f64>() / rr.len() as f64;
        let sdnn = (rr.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / rr.len() as f64).sqrt();
        assert!(sdnn > 10.0 && sdnn < 120.0, "SDNN {sdnn}");
        // Beat times follow the intervals and never go backwards.
        assert!(beats.windows(2).all(|w| w[1].0 > w[0].0));
        // Called in slices, the heart continues where it stopped.
        let mut sliced = Heart::new(7, 0);
        let mut again = Vec::new();
        for s in 1..=300 {
            again.extend(sliced.beats_until(s * 1_000_000));
        }
        assert_eq!(again.len(), beats.len());
    }

    #[test]
    fn spo2_stays_in_range_with_occasional_desaturations() {
        let mut ox = Oximeter::new(3);
        let values: Vec<f32> = (0..3_600).map(|s| ox.spo2(s * 1_000_000)).collect();
        assert!(values.iter().all(|v| (50.0..=100.0).contains(v)));
        assert!(
            values.iter().any(|v| *v < 92.0),
            "an hour has desaturations"
        );
        let ppg = ox.ppg(0, 70.0);
        assert!(ppg.iter().all(|v| v.abs() < 100_000.0));
    }

    #[test]
    fn eeg_stays_in_range_and_alpha_is_strongest_occipitally() {
        let mut eeg = Eeg::new(5);
        let samples: Vec<[f32; 8]> = (0..2_560).map(|i| eeg.sample(i * 3_906)).collect();
        assert!(samples.iter().flatten().all(|v| v.abs() <= 2_000.0));
        let power = |c: usize| samples.iter().map(|s| f64::from(s[c]).powi(2)).sum::<f64>();
        assert!(power(7) > power(0), "O2 carries more alpha than Fp1");
    }

    /// Whether every value is a whole number of `step`s (to float32's precision).
    fn on_grid(values: impl IntoIterator<Item = f32>, step: f64) -> bool {
        values.into_iter().all(|v| {
            let steps = f64::from(v) / step;
            (steps - steps.round()).abs() < 1e-3
        })
    }

    #[test]
    fn every_signal_is_quantised_as_its_device_reports_it() {
        let mut heart = Heart::new(11, 0);
        let beats = heart.beats_until(120_000_000);
        assert!(on_grid(
            beats.iter().map(|(_, rr)| *rr),
            resolution::RR_INTERVAL_MS
        ));
        // A beat comes exactly one reported interval after the one before it (to the µs).
        assert!(beats
            .windows(2)
            .all(|w| ((w[1].0 - w[0].0) as f64 - f64::from(w[1].1) * 1e3).abs() <= 1.0));
        let rates: Vec<f32> = (0..120).map(|s| heart.rate_bpm(s * 1_000_000)).collect();
        assert!(on_grid(rates, resolution::HEART_RATE_BPM));
        let mut ox = Oximeter::new(11);
        let spo2: Vec<f32> = (0..120).map(|s| ox.spo2(s * 1_000_000)).collect();
        assert!(on_grid(spo2, resolution::SPO2_PERCENT));
        let ppg: Vec<f32> = (0..1_000).flat_map(|i| ox.ppg(i * 10_000, 70.0)).collect();
        assert!(on_grid(ppg, resolution::PPG_COUNTS));
        let mut eeg = Eeg::new(11);
        let eeg: Vec<f32> = (0..2_560).flat_map(|i| eeg.sample(i * 3_906)).collect();
        assert!(on_grid(eeg.iter().copied(), resolution::EEG_UV));
        // Not trivially: the EEG still uses its resolution (many distinct values).
        let distinct: std::collections::HashSet<u32> = eeg.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() > 1_000, "{}", distinct.len());
    }

    #[test]
    fn the_ecg_beats_at_a_heart_rate_in_whole_microvolts() {
        // At today's timestamps, as the benchmarks call it.
        let t0 = 1_795_000_000_000_000;
        let samples: Vec<f32> = (0..60_000).map(|i| ecg_mv(3, t0 + i * 1_000)).collect();
        assert!(on_grid(samples.iter().copied(), resolution::ECG_MV));
        assert!(
            samples.iter().all(|v| (-10.0..=10.0).contains(v)),
            "inside ecg's range"
        );
        // R peaks: local maxima above 0.8 mV, at least 300 ms apart.
        let mut peaks = Vec::new();
        for (i, w) in samples.windows(3).enumerate() {
            if w[1] > 0.8
                && w[1] >= w[0]
                && w[1] >= w[2]
                && peaks.last().is_none_or(|p| i - p > 300)
            {
                peaks.push(i);
            }
        }
        assert!(
            (50..=90).contains(&peaks.len()),
            "{} beats in a minute",
            peaks.len()
        );
        // Noisy, not a clean template: neighbouring samples differ.
        let distinct: std::collections::HashSet<u32> =
            samples.iter().map(|v| v.to_bits()).collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
        // Stateless: the same person and time give the same sample; another person differs.
        assert_eq!(ecg_mv(3, t0 + 123_000), samples[123]);
        assert!((0..1_000).any(|i| ecg_mv(4, t0 + i * 1_000) != samples[i as usize]));
    }
}
