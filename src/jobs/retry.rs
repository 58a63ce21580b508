//! When a failed attempt runs again: exponential backoff with jitter, capped.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, after `attempt` failed: base·2^(attempt−1), capped,
    /// then scaled by a random factor in [0.5, 1) so that jobs that failed together do not all
    /// return together.
    pub fn delay(&self, attempt: i32, unit_random: f64) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
        let raw = self
            .base
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.cap);
        raw.mul_f64(0.5 + 0.5 * unit_random.clamp(0.0, 1.0))
    }
}

/// A uniform random number in [0, 1) from the OS.
pub fn unit_random() -> f64 {
    f64::from(getrandom::u32().unwrap_or(u32::MAX / 2)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
        }
    }

    #[test]
    fn delays_double_then_stop_at_the_cap() {
        let p = policy();
        let full: Vec<u64> = (1..=6)
            .map(|a| p.delay(a, 1.0).as_millis() as u64)
            .collect();
        assert_eq!(full, [1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn jitter_spreads_delays_over_the_upper_half() {
        let p = policy();
        assert_eq!(p.delay(3, 0.0), Duration::from_secs(2));
        assert!(p.delay(3, 0.999) < Duration::from_secs(4));
    }
}
