//! A curve kept in bounded memory as it streams in: points fall into buckets of
//! `width` consecutive steps, and when there are more than `cap` buckets the width
//! doubles and neighbours merge. A bucket keeps the mean, min and max of its points,
//! so a spike survives downsampling as the bucket's max.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub first_step: u64,
    pub last_step: u64,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// Sum of the points' wall times (seconds since the run started).
    pub time_sum: f64,
}

impl Bucket {
    fn of(step: u64, time: f64, value: f64) -> Self {
        Bucket {
            first_step: step,
            last_step: step,
            count: 1,
            sum: value,
            min: value,
            max: value,
            time_sum: time,
        }
    }

    fn merge(&mut self, o: &Bucket) {
        self.first_step = self.first_step.min(o.first_step);
        self.last_step = self.last_step.max(o.last_step);
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.time_sum += o.time_sum;
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

#[derive(Clone, Debug)]
pub struct Curve {
    width: u64,
    cap: usize,
    buckets: Vec<Bucket>,
}

/// A curve as sent to the page: one entry per bucket.
#[derive(Serialize, Debug, PartialEq, Default)]
pub struct Points {
    /// The bucket's mean step and mean wall time: where its point is drawn.
    pub step: Vec<f64>,
    pub time: Vec<f64>,
    pub mean: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl Curve {
    pub fn new(cap: usize) -> Self {
        Curve {
            width: 1,
            cap: cap.max(2),
            buckets: Vec::new(),
        }
    }

    pub fn push(&mut self, step: u64, time: f64, value: f64) {
        if !value.is_finite() {
            return;
        }
        let point = Bucket::of(step, time, value);
        match self.buckets.last_mut() {
            Some(last) if last.first_step / self.width == step / self.width => last.merge(&point),
            _ => self.buckets.push(point),
        }
        while self.buckets.len() > self.cap {
            self.width *= 2;
            let width = self.width;
            self.buckets = merge_runs(&self.buckets, |a, b| {
                a.first_step / width == b.first_step / width
            });
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// At most `max_points` points: consecutive buckets merged in equal groups.
    pub fn points(&self, max_points: usize) -> Points {
        let group = self.buckets.len().div_ceil(max_points.max(1)).max(1);
        let merged = if group == 1 {
            self.buckets.clone()
        } else {
            self.buckets
                .chunks(group)
                .map(|c| {
                    let mut b = c[0];
                    c[1..].iter().for_each(|o| b.merge(o));
                    b
                })
                .collect()
        };
        let mut p = Points::default();
        for b in &merged {
            p.step.push(round(
                (b.first_step + b.last_step) as f64 / 2.0,
                b.count > 1,
            ));
            p.time.push(round(b.time_sum / b.count as f64, true));
            p.mean.push(round(b.mean(), true));
            p.min.push(round(b.min, true));
            p.max.push(round(b.max, true));
        }
        p
    }
}

/// Merges each run of neighbouring buckets that `same` groups together.
fn merge_runs(buckets: &[Bucket], same: impl Fn(&Bucket, &Bucket) -> bool) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::with_capacity(buckets.len() / 2 + 1);
    for b in buckets {
        match out.last_mut() {
            Some(last) if same(last, b) => last.merge(b),
            _ => out.push(*b),
        }
    }
    out
}

/// Seven significant digits: what a chart can show, and half the bytes of an f64.
fn round(v: f64, fractional: bool) -> f64 {
    if !fractional || v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(6 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Brute force in f64 over the raw points a bucket covers.
    fn check_against_raw(curve: &Curve, raw: &[(u64, f64, f64)]) {
        let mut covered = 0;
        for b in curve.buckets() {
            let inside: Vec<_> = raw
                .iter()
                .filter(|p| (b.first_step..=b.last_step).contains(&p.0))
                .collect();
            assert_eq!(inside.len() as u64, b.count);
            let mean = inside.iter().map(|p| p.2).sum::<f64>() / inside.len() as f64;
            assert!((mean - b.mean()).abs() <= 1e-12 * mean.abs().max(1.0));
            let min = inside.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
            let max = inside.iter().map(|p| p.2).fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((b.min, b.max), (min, max));
            covered += inside.len();
        }
        assert_eq!(covered, raw.len(), "every point in exactly one bucket");
    }

    #[test]
    fn buckets_hold_exact_mean_min_max_within_the_cap() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (n, cap) in [(10, 64), (1000, 64), (100_000, 500), (4097, 4)] {
            let mut curve = Curve::new(cap);
            let mut raw = Vec::new();
            for step in 1..=n as u64 {
                let v = 5.0 / (step as f64).sqrt() + rng.random::<f64>();
                raw.push((step, step as f64 * 0.1, v));
                curve.push(step, step as f64 * 0.1, v);
            }
            assert!(curve.len() <= cap, "{} buckets > cap {cap}", curve.len());
            assert!(n < cap || curve.len() > cap / 2, "does not over-merge");
            check_against_raw(&curve, &raw);
        }
    }

    #[test]
    fn a_spike_survives_as_the_max() {
        let mut curve = Curve::new(100);
        for step in 1..=100_000u64 {
            let v = if step == 61_234 { 50.0 } else { 2.0 };
            curve.push(step, 0.0, v);
        }
        let p = curve.points(40);
        assert!(p.mean.len() <= 40);
        assert_eq!(p.max.iter().cloned().fold(0.0, f64::max), 50.0);
        assert_eq!(p.min.iter().cloned().fold(f64::INFINITY, f64::min), 2.0);
    }

    #[test]
    fn sparse_curves_are_sent_whole_and_non_finite_values_skipped() {
        let mut curve = Curve::new(1024);
        for step in (0..=2000).step_by(100) {
            curve.push(step, step as f64, 1.0 / (1.0 + step as f64));
        }
        curve.push(2100, 0.0, f64::NAN);
        let p = curve.points(1000);
        assert_eq!(p.step.len(), 21);
        assert_eq!(p.step[3], 300.0);
        assert_eq!(p.mean, p.min);
    }

    #[test]
    fn points_merge_groups_to_the_requested_count() {
        let mut curve = Curve::new(1000);
        for step in 0..1000u64 {
            curve.push(step, step as f64, step as f64);
        }
        let p = curve.points(100);
        assert_eq!(p.mean.len(), 100);
        assert_eq!(p.mean[0], 4.5);
        assert_eq!((p.min[99], p.max[99]), (990.0, 999.0));
    }
}
