//! Schedules of `--mode rate` and the stability rule of the measurement windows (pure,
//! unit-tested).

use std::time::Duration;

use anyhow::bail;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::options::Distribution;

/// Intervals between scheduled sends in `--mode rate`.
pub struct Schedule {
    mean_secs: f64,
    distribution: Distribution,
    rng: StdRng,
}

impl Schedule {
    pub fn new(rate: f64, distribution: Distribution, seed: u64) -> anyhow::Result<Self> {
        if !rate.is_finite() || rate <= 0.0 {
            bail!("--rate must be a positive number of requests per second, got {rate}");
        }
        Ok(Schedule {
            mean_secs: 1.0 / rate,
            distribution,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The time from one scheduled send to the next.
    pub fn next_interval(&mut self) -> Duration {
        let secs = match self.distribution {
            Distribution::Constant => self.mean_secs,
            Distribution::Poisson => {
                // Inverse transform: 1 - u lies in (0, 1], so the logarithm is finite.
                let u: f64 = self.rng.random();
                -(1.0 - u).ln() * self.mean_secs
            }
        };
        // A rate so low that the interval overflows a Duration just never sends again.
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// The figures the stability rule compares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowFigures {
    pub throughput: f64,
    pub p50_us: f64,
}

/// perf_analyzer's rule: stable when the last three windows all completed requests and, for
/// both throughput and p50 latency, max / min ≤ 1 + percent/100.
pub fn is_stable(windows: &[WindowFigures], percent: f64) -> bool {
    const STABILITY_WINDOWS: usize = 3;
    if windows.len() < STABILITY_WINDOWS {
        return false;
    }
    let last = &windows[windows.len() - STABILITY_WINDOWS..];
    let within = |values: &mut dyn Iterator<Item = f64>| {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values {
            if v.is_nan() || v <= 0.0 || v.is_infinite() {
                return false;
            }
            min = min.min(v);
            max = max.max(v);
        }
        max / min <= 1.0 + percent / 100.0
    };
    within(&mut last.iter().map(|w| w.throughput)) && within(&mut last.iter().map(|w| w.p50_us))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn w(throughput: f64, p50_us: f64) -> WindowFigures {
        WindowFigures { throughput, p50_us }
    }

    #[test]
    fn stability_needs_three_windows_within_the_percentage() {
        assert!(!is_stable(&[], 10.0));
        assert!(!is_stable(&[w(100.0, 10.0), w(100.0, 10.0)], 10.0));
        assert!(is_stable(&[w(100.0, 10.0), w(105.0, 10.5), w(109.9, 10.9)], 10.0));
        // Throughput spread 11 %.
        assert!(!is_stable(
            &[w(100.0, 10.0), w(105.0, 10.0), w(111.0, 10.0)],
            10.0
        ));
        // Latency spread 20 % with a flat throughput.
        assert!(!is_stable(
            &[w(100.0, 10.0), w(100.0, 12.0), w(100.0, 10.0)],
            10.0
        ));
        // Only the last three count.
        assert!(is_stable(
            &[w(10.0, 99.0), w(100.0, 10.0), w(101.0, 10.0), w(99.0, 10.0)],
            10.0
        ));
        assert!(!is_stable(
            &[w(100.0, 10.0), w(101.0, 10.0), w(99.0, 10.0), w(10.0, 99.0)],
            10.0
        ));
        // A window without completed requests is never stable.
        assert!(!is_stable(&[w(0.0, 0.0), w(0.0, 0.0), w(0.0, 0.0)], 10.0));
        // The percentage is a parameter.
        assert!(is_stable(&[w(100.0, 10.0), w(120.0, 10.0), w(110.0, 11.0)], 25.0));
        assert!(!is_stable(
            &[w(100.0, 10.0), w(120.0, 10.0), w(110.0, 11.0)],
            10.0
        ));
    }

    #[test]
    fn constant_schedule_has_equal_intervals() {
        let mut s = Schedule::new(1000.0, Distribution::Constant, 1).unwrap();
        for _ in 0..100 {
            assert_eq!(s.next_interval(), Duration::from_millis(1));
        }
        assert!(Schedule::new(0.0, Distribution::Constant, 1).is_err());
        assert!(Schedule::new(-5.0, Distribution::Poisson, 1).is_err());
        assert!(Schedule::new(f64::NAN, Distribution::Poisson, 1).is_err());
        // An absurdly low rate saturates instead of panicking.
        let mut s = Schedule::new(1e-300, Distribution::Constant, 1).unwrap();
        assert_eq!(s.next_interval(), Duration::MAX);
    }

    #[test]
    fn poisson_schedule_is_exponential_with_the_right_mean() {
        let rate = 2000.0;
        let mut s = Schedule::new(rate, Distribution::Poisson, 42).unwrap();
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| s.next_interval().as_secs_f64()).collect();
        assert!(xs.iter().all(|&x| x.is_finite() && x >= 0.0));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Exponential: mean 1/rate, coefficient of variation 1, P(X > mean) = e^-1.
        assert!((mean * rate - 1.0).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() / mean - 1.0).abs() < 0.02, "cv {}", var.sqrt() / mean);
        let above = xs.iter().filter(|&&x| x > 1.0 / rate).count() as f64 / n as f64;
        assert!((above - (-1.0f64).exp()).abs() < 0.01, "P(X > mean) = {above}");
        // The same seed gives the same schedule; another seed another one.
        let mut a = Schedule::new(rate, Distribution::Poisson, 7).unwrap();
        let mut b = Schedule::new(rate, Distribution::Poisson, 7).unwrap();
        let mut c = Schedule::new(rate, Distribution::Poisson, 8).unwrap();
        let (va, vb, vc): (Vec<_>, Vec<_>, Vec<_>) = (0..10)
            .map(|_| (a.next_interval(), b.next_interval(), c.next_interval()))
            .fold((vec![], vec![], vec![]), |mut acc, (x, y, z)| {
                acc.0.push(x);
                acc.1.push(y);
                acc.2.push(z);
                acc
            });
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }
}
