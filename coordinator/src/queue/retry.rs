//! `RetryPolicy`: how many attempts a job gets and how long a failed job
//! waits before it may be claimed again (exponential backoff with jitter).

use std::time::Duration;

use rand::Rng;

/// Attempt limit and backoff of failed jobs.
///
/// After failed attempt `n` (1-based) a retryable job waits a random time in
/// `[ceiling / 2, ceiling]` where `ceiling = min(max_delay, base_delay * 2^(n-1))`;
/// a job whose attempt `max_attempts` fails is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_secs(5),
            max_delay: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The longest wait after failed attempt `failed_attempt`.
    pub fn backoff_ceiling(&self, failed_attempt: i32) -> Duration {
        let doublings = failed_attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// The jittered wait after failed attempt `failed_attempt`.
    pub fn backoff_after(&self, failed_attempt: i32) -> Duration {
        let ceiling = self.backoff_ceiling(failed_attempt);
        let half = ceiling / 2;
        let spread_nanos = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::rng().random_range(0..=spread_nanos))
    }
}

/// Milliseconds of a duration, saturating, for binding as a SQL integer.
pub(crate) fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        }
    }

    #[test]
    fn ceiling_doubles_per_attempt_up_to_the_maximum() {
        let policy = policy();
        assert_eq!(policy.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(policy.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(policy.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(policy.backoff_ceiling(5), Duration::from_millis(1000));
        assert_eq!(
            policy.backoff_ceiling(i32::MAX),
            Duration::from_millis(1000)
        );
        assert_eq!(policy.backoff_ceiling(0), Duration::from_millis(100));
    }

    #[test]
    fn jittered_backoff_stays_between_half_and_full_ceiling() {
        let policy = policy();
        for attempt in 1..=6 {
            let ceiling = policy.backoff_ceiling(attempt);
            for _ in 0..200 {
                let wait = policy.backoff_after(attempt);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "{wait:?} vs {ceiling:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_actually_varies() {
        let policy = policy();
        let waits: std::collections::HashSet<_> =
            (0..50).map(|_| policy.backoff_after(3)).collect();
        assert!(waits.len() > 1);
    }

    #[test]
    fn zero_delays_give_zero_waits() {
        let policy = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        assert_eq!(policy.backoff_after(1), Duration::ZERO);
    }
}
