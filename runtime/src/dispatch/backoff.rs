//! Retry delays: exponential from a base, capped, with jitter so events that
//! failed together do not come back together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the delay to spread by, in [0, 1].
    pub jitter: f64,
}

impl Backoff {
    /// Delay before the next attempt after the `failures`-th failed one
    /// (1-based): `base * 2^(failures-1)`, capped at `max`, then ±jitter.
    pub fn delay(&self, failures: i32) -> Duration {
        let exp = failures.saturating_sub(1).clamp(0, 62) as u32;
        let raw = self.base.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = raw.min(self.max.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            rand::rng().random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((capped * (1.0 + spread)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
            jitter: 0.0,
        };
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(4), Duration::from_secs(8));
        assert_eq!(b.delay(5), Duration::from_secs(10));
        assert_eq!(b.delay(1000), Duration::from_secs(10));
        assert_eq!(b.delay(0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_band_and_varies() {
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(100),
            jitter: 0.2,
        };
        let delays: Vec<f64> = (0..200).map(|_| b.delay(1).as_secs_f64()).collect();
        assert!(
            delays.iter().all(|d| (8.0..=12.0).contains(d)),
            "{delays:?}"
        );
        let distinct = delays
            .iter()
            .map(|d| (d * 1000.0) as i64)
            .collect::<std::collections::HashSet<_>>();
        assert!(distinct.len() > 10, "jitter should spread delays");
    }
}
